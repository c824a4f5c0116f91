"""Peak memory of full finetuning with each optimizer, against plain AdamW, side by side in one run.

Optimizers: "adamw" (torch.optim.AdamW, the baseline), "sgd" (torch.optim.SGD), "lomo" (LOMO: SGD fused
into backward, no state, global-norm clipping at 1.0 by two backward passes) and "fused-adamw" (AdamW's
update fused into backward, per-tensor clipping; AdaLomo-like). Each (model, optimizer) runs in its own process. A sampler thread records the process RSS every
2 ms during the training steps (CPU), or torch.cuda.max_memory_allocated is read (CUDA). Reported: RSS
before the first step (weights loaded), peak during training, their difference (the training
overhead: gradients, optimizer state, activations), the largest set of gradients alive at once
(observed in gradient hooks), and each optimizer's training overhead as a ratio of AdamW's.

Models: "tiny" (the tests' 2-layer model, a smoke run), "small" (a random 8-layer Llama, hidden 512, 29M parameters), "default" (SmolLM2-135M-Instruct)
and "smollm2-shape" (SmolLM2-135M's shapes with random weights, for machines without the model file);
all fp32. Data: random token ids, batch 2 x 128 (memory does not depend on them).

    python benchmarks/lomo_memory.py [--models small,default] [--optimizers adamw,sgd,lomo,fused-adamw]
                                     [--steps 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "lomo_memory.json"
MIB = 1024 * 1024


def load(name: str, device: str):
    import torch

    if name == "tiny":  # the test suite's 2-layer model: a quick check that the script runs
        from deltatune.testing import tiny_model

        model = tiny_model(0)
    elif name == "small":
        from transformers import LlamaForCausalLM

        from deltatune.testing import tiny_llama_config

        torch.manual_seed(0)
        cfg = tiny_llama_config(
            vocab_size=8192,
            hidden_size=512,
            intermediate_size=1536,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
        )
        model = LlamaForCausalLM(cfg)
    elif name == "smollm2-shape":  # the default model's exact shapes, random weights (no file needed: GPU runs)
        from transformers import LlamaForCausalLM

        from deltatune.testing import tiny_llama_config

        torch.manual_seed(0)
        cfg = tiny_llama_config(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
        )
        model = LlamaForCausalLM(cfg)
    else:
        from deltatune.models import load_model

        model, _ = load_model(None, dtype=torch.float32)
    return model.to(device).train()


class RssSampler:
    def __init__(self) -> None:
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


OPTIMIZERS = ("adamw", "sgd", "lomo", "fused-adamw")
FUSED = ("lomo", "fused-adamw")


def child(model_name: str, optimizer: str, steps: int, device: str) -> dict:
    import psutil
    import torch

    from deltatune.train.lomo import build_fused

    torch.set_num_threads(2)
    model = load(model_name, device)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    ids = torch.randint(3, model.config.vocab_size, (2, 128), device=device)  # tiny: 512-token vocabulary
    if optimizer in FUSED:
        opt = build_fused(optimizer, params, lr=1e-5, max_norm=1.0)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=1e-5)
    else:
        opt = torch.optim.AdamW(params, lr=1e-5, foreach=False)  # foreach would add temporaries; be fair to plain

    live = [0]

    def observe(_):
        live[0] = max(live[0], sum(p.grad.nbytes for p in params if p.grad is not None))

    handles = [p.register_post_accumulate_grad_hook(observe) for p in params]
    before = psutil.Process().memory_info().rss
    if device == "cuda":
        torch.cuda.synchronize()
        before_cuda = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with RssSampler() as sampler:
        for _ in range(steps):
            loss = model(ids, labels=ids).loss
            if optimizer in FUSED:
                opt.backward(loss)  # LOMO: two passes (norm, then clipped update)
                opt.step()
            else:
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            del loss
    seconds = (time.perf_counter() - t0) / steps
    for h in handles:
        h.remove()
    state = sum(t.nbytes for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    out = {
        "model": model_name,
        "optimizer": optimizer,
        "device": device,
        "params": n_params,
        "optimizer_state_mib": round(state / MIB, 1),
        "weights_mib": round(sum(p.nbytes for p in params) / MIB, 1),
        "rss_before_mib": round(before / MIB, 1),
        "rss_peak_mib": round(sampler.peak / MIB, 1),
        "rss_overhead_mib": round((sampler.peak - before) / MIB, 1),
        "max_live_grad_mib": round(live[0] / MIB, 2),
        "seconds_per_step": round(seconds, 3),
    }
    if device == "cuda":
        out["cuda_before_mib"] = round(before_cuda / MIB, 1)
        out["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / MIB, 1)
        out["cuda_overhead_mib"] = round((torch.cuda.max_memory_allocated() - before_cuda) / MIB, 1)
    return out


def main() -> None:
    import platform

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="small,default")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/lomo_memory[_cuda].json)")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "OPTIMIZER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.steps, args.device)))
        return
    optimizers = args.optimizers.split(",")
    if "adamw" not in optimizers:
        optimizers.insert(0, "adamw")  # the baseline every ratio is against
    rows = []
    for model in args.models.split(","):
        for optimizer in optimizers:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                model,
                optimizer,
                "--steps",
                str(args.steps),
                "--device",
                args.device,
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"{model}/{optimizer} failed")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"ran {model}/{optimizer}", file=sys.stderr, flush=True)
    key = "cuda_overhead_mib" if args.device == "cuda" else "rss_overhead_mib"
    peak = "cuda_peak_mib" if args.device == "cuda" else "rss_peak_mib"
    for r in rows:
        base = next(x for x in rows if x["model"] == r["model"] and x["optimizer"] == "adamw")
        r["overhead_vs_adamw"] = round(r[key] / base[key], 3) if base[key] else None
        r["peak_vs_adamw"] = round(r[peak] / base[peak], 3) if base[peak] else None
        r["saved_vs_adamw_mib"] = round(base[key] - r[key], 1)
    cols = [
        "model",
        "optimizer",
        "params",
        "weights_mib",
        "optimizer_state_mib",
        "rss_before_mib",
        "rss_peak_mib",
        "rss_overhead_mib",
        "max_live_grad_mib",
        "overhead_vs_adamw",
        "peak_vs_adamw",
        "saved_vs_adamw_mib",
        "seconds_per_step",
    ]
    if args.device == "cuda":
        cols[5:8] = ["cuda_before_mib", "cuda_peak_mib", "cuda_overhead_mib"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    default = RESULTS if args.device == "cpu" else RESULTS.with_name("lomo_memory_cuda.json")
    out = Path(args.out) if args.out else default
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    machine = {"cpu": _cpu_model(), "platform": platform.platform(), "python": platform.python_version()}
    tmp.write_text(
        json.dumps(
            {"steps": args.steps, "batch": [2, 128], "dtype": "fp32", "machine": machine, "rows": rows}, indent=2
        )
        + "\n"
    )
    tmp.replace(out)
    print(f"wrote {out}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor()


if __name__ == "__main__":
    main()
