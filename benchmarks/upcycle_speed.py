"""Training-step time and peak memory: the default model dense vs sparse-upcycled.

Upcycled: E=8 experts, top-2 (raw softmax weights, no capacity limit), every other layer (15 of
SmolLM2-135M's 30). Each (variant, method) runs in its own child process so its peak RSS is its
own; repeats are interleaved (dense, upcycled, dense, upcycled, ...) and the median step time over
repeats is reported. One step = forward to the final hidden states, deltatune's chunked LM loss,
the MoE auxiliary losses (upcycled), backward, clip, AdamW step, on a fixed batch of --rows packed
rows of --seq-len tokens (GSM8K text), precision as `deltatune train` picks it (bf16 where the CPU
has it, else fp32). Methods: lora (r=8, all linear layers, experts and routers included) and full.

Expected: top-2 on half the layers adds about 1.3x the MLP FLOPs, so a step should cost at most
1.5x the dense step; peak memory should grow by at most the extra weights plus, for what extra
trains (all of it under full finetuning, the experts' LoRA factors under LoRA), gradients and two
AdamW moments ("bound" column; routed activations come on top and grow with tokens per step).

    python benchmarks/upcycle_speed.py [--repeats 3] [--steps 5] [--warmup 2] [--methods lora,full]

Writes benchmarks/results/upcycle_speed.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.machine import command_line  # noqa: E402

GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
RESULTS = REPO / "benchmarks" / "results" / "upcycle_speed.json"


def cpu_info() -> dict:
    model, flags = platform.processor(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma", "f16c"))]
                break
    except OSError:
        pass
    import torch

    return {
        "cpu": model,
        "flags": flags,
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
    }


def child(variant: str, method: str, steps: int, warmup: int, rows: int, seq_len: int) -> dict:
    import torch

    from deltatune.config import TrainConfig
    from deltatune.models import load_model
    from deltatune.train.loop import method_specs, pick_device, pick_precision
    from deltatune.train.loss import weighted_lm_loss_sum
    from deltatune.train.optim import build_optimizer
    from deltatune.upcycle.convert import UpcycleSpec, count_parameters, upcycle
    from deltatune.upcycle.losses import RouterLosses

    torch.manual_seed(0)
    cfg = TrainConfig(method=method, rank=8, alpha=16, lr=2e-4 if method == "lora" else 2e-5, output="/dev/null")
    precision = pick_precision(cfg, pick_device("cpu"))
    full = method == "full"
    model, tok = load_model(None, dtype=torch.bfloat16 if precision == "bf16" and not full else torch.float32)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if variant == "upcycled":
        upcycle(model, UpcycleSpec(experts=8, layers=list(range(1, model.config.num_hidden_layers, 2)), k=2))
    counts = count_parameters(model)
    from deltatune.methods.apply import apply_methods

    adapted = apply_methods(model, method_specs(cfg))
    trainable = adapted.trainable_parameters()
    with torch.no_grad():
        for _, p in trainable:
            p.data = p.data.float()
    params = [p for _, p in trainable]
    opt = build_optimizer(params, cfg)
    losses = RouterLosses(model, 0.01, 0.0)
    text = " ".join(json.loads(line)["answer"] for line in GSM8K.read_text().splitlines()[:400])
    ids = tok(text, add_special_tokens=False)["input_ids"][: rows * seq_len]
    input_ids = torch.tensor(ids).view(rows, seq_len)
    weights = torch.ones_like(input_ids, dtype=torch.float32)
    head = model.get_output_embeddings()
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if precision == "bf16"
        else (lambda: torch.autocast("cpu", enabled=False))
    )
    model.train()
    times = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        with autocast():
            hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
        loss_sum, w = weighted_lm_loss_sum(hidden, head, input_ids, weights, chunk=1024)
        loss = loss_sum / w + losses.collect()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return {
        "variant": variant,
        "method": method,
        "precision": precision,
        "step_s": statistics.median(times),
        "step_times": times,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_load_mib": rss_loaded,
        "params": counts["total"],
        "active_params": counts["active_per_token"],
        "trainable": sum(p.numel() for p in params),
        "tokens_per_step": rows * seq_len,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        variant, method = args.child.split(":")
        print(json.dumps(child(variant, method, args.steps, args.warmup, args.rows, args.seq_len)))
        return 0
    runs = []
    for rep in range(args.repeats):
        for method in args.methods.split(","):
            for variant in ("dense", "upcycled"):  # interleaved: both see the same machine load
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    f"{variant}:{method}",
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                    "--rows",
                    str(args.rows),
                    "--seq-len",
                    str(args.seq_len),
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True)
                res = json.loads(out.stdout.strip().splitlines()[-1])
                res["repeat"] = rep
                runs.append(res)
                print(
                    f"  repeat {rep} {method:5s} {variant:8s} step {res['step_s']:.3f}s "
                    f"peak RSS {res['peak_rss_mib']:.0f} MiB",
                    flush=True,
                )
    summary = []
    for method in args.methods.split(","):
        row = {"method": method}
        for variant in ("dense", "upcycled"):
            rs = [r for r in runs if r["method"] == method and r["variant"] == variant]
            row[variant] = {
                "step_s": statistics.median(r["step_s"] for r in rs),
                "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs),
                "params": rs[0]["params"],
                "active_params": rs[0]["active_params"],
                "trainable": rs[0]["trainable"],
                "precision": rs[0]["precision"],
            }
        extra = row["upcycled"]["params"] - row["dense"]["params"]
        bytes_per = 4 if method == "full" or row["dense"]["precision"] == "fp32" else 2
        extra_trainable = row["upcycled"]["trainable"] - row["dense"]["trainable"]
        # extra frozen weights, plus fp32 weights, gradients and AdamW's two moments of what extra trains
        row["extra_weights_mib"] = extra * bytes_per / 2**20
        row["memory_bound_mib"] = ((extra - extra_trainable) * bytes_per + 16 * extra_trainable) / 2**20
        row["step_ratio"] = row["upcycled"]["step_s"] / row["dense"]["step_s"]
        row["rss_growth_mib"] = row["upcycled"]["peak_rss_mib"] - row["dense"]["peak_rss_mib"]
        summary.append(row)
    info = cpu_info()
    result = {
        "command": command_line(),
        "machine": info,
        "settings": vars(args) | {"experts": 8, "k": 2, "layers": "every-other"},
        "summary": summary,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\n{info['cpu']}, {info['threads']} threads, flags {' '.join(info['flags'])}; "
        f"{args.rows}x{args.seq_len} tokens per step, median of {args.repeats} interleaved repeats"
    )
    print(
        f"{'method':6s} {'dense s/step':>12s} {'upcycled':>9s} {'ratio':>6s} {'dense RSS':>10s} "
        f"{'upcycled':>9s} {'growth':>7s} {'bound':>7s}"
    )
    for r in summary:
        print(
            f"{r['method']:6s} {r['dense']['step_s']:12.3f} {r['upcycled']['step_s']:9.3f} {r['step_ratio']:6.2f} "
            f"{r['dense']['peak_rss_mib']:10.0f} {r['upcycled']['peak_rss_mib']:9.0f} {r['rss_growth_mib']:7.0f} "
            f"{r['memory_bound_mib']:7.0f}"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
