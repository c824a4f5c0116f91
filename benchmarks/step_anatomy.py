"""Where a LoRA step's time goes beyond its matrix products: the step in parts, and its per-operation floor.

`roofline.py` bounds the step by its matmuls alone; this script measures the rest. It runs the main
benchmark's LoRA steps (SmolLM2-135M, GSM8K, chat template, response-only loss, 4 rows of 256 tokens laid
end to end, LoRA r=8 on all linear layers, bf16 autocast where the CPU has it, packed attention, the fused
norms, fused AdamW: what `deltatune train` runs on CPU) in-process, and times forward, loss, backward and
optimizer step, median over the steps after the first pass over the batches (so every matmul shape has
been seen once), in two models:

- real: the default model;
- thin: the same model shrunk to hidden size 64, one attention head and MLP width 128 (same 30 layers, same
  tokens, spans and LoRA placement). Its matmuls and element-wise passes are tiny, so its step time is the
  cost of the operations themselves (Python, dispatch, autograd, the attention's loop over examples): a
  floor that no faster kernel lowers, only fewer operations.

It also counts the operators one step dispatches (torch's profiler, one pass). With `--onednn` each model
runs again in a child process with `ONEDNN_VERBOSE=profile_create,profile_exec`, and the script adds up
what oneDNN reports: the time its matmul primitives execute, and the time spent creating primitives for
shapes not seen before (a new primitive per shape: the step's token count changes with its examples).

    python benchmarks/step_anatomy.py [--batches 10] [--passes 3] [--onednn]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command_line, describe, machine_record, native_precision  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "step_anatomy.json"
PARTS = ("forward", "loss", "backward", "optimizer", "step")


def build(thin: bool, bf16: bool):
    """(model, trainable parameters) of the benchmark's LoRA run, the default model or its thin copy."""
    import torch

    from deltatune.config import TrainConfig
    from deltatune.methods.apply import apply_methods
    from deltatune.models import load_model
    from deltatune.train import fused_norms, packed_attention
    from deltatune.train.loop import method_specs

    dtype = torch.bfloat16 if bf16 else torch.float32
    model, _ = load_model(None, dtype=dtype)
    if thin:
        from transformers import AutoModelForCausalLM

        config = model.config
        config.update({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 1})
        config.update({"num_key_value_heads": 1, "head_dim": 64})
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    adapted = apply_methods(model, method_specs(TrainConfig(method="lora", rank=8, alpha=16, dropout=0.0)))
    model = adapted.model
    trainable = [p for _, p in adapted.trainable_parameters()]
    with torch.no_grad():
        for p in trainable:
            p.data = p.data.float()  # fp32 master weights, as training keeps them
    model.set_attn_implementation(packed_attention.register())
    _, why_not = fused_norms.install(model)
    assert why_not is None, why_not
    return model.train(), trainable


def child(thin: bool, n_batches: int, passes: int, precision: str, count_ops: bool) -> dict:
    """Times of each part over `passes` passes of `n_batches` steps; medians after the first pass."""
    import torch
    from roofline import benchmark_batches
    from torch.profiler import ProfilerActivity, profile

    from deltatune.models import load_tokenizer
    from deltatune.train import packed_attention
    from deltatune.train.loss import weighted_lm_loss_sum

    batches = [batch for _, batch in benchmark_batches(load_tokenizer(None), n_batches)]
    bf16 = precision == "bf16"
    model, trainable = build(thin, bf16)
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, fused=True)
    head, decoder = model.get_output_embeddings(), model.get_decoder()
    times: dict[str, list[float]] = {p: [] for p in PARTS}

    def step(batch: dict) -> list[float]:
        t0 = time.perf_counter()
        spans = packed_attention.spans_argument(model, batch["position_ids"])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hidden = decoder(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], packed_spans=spans, use_cache=False
            ).last_hidden_state
        t1 = time.perf_counter()
        loss_sum, _ = weighted_lm_loss_sum(hidden, head, batch["input_ids"], batch["loss_weights"])
        loss = loss_sum / batch["loss_weights"][:, 1:].sum()
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        return [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0]

    for p in range(passes):
        for batch in batches:
            parts = step(batch)
            if p > 0:  # the first pass builds every shape's kernels
                for name, t in zip(PARTS, parts):
                    times[name].append(t)
    ops = None
    if count_ops:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for batch in batches:
                step(batch)
        ops = sum(e.count for e in prof.key_averages()) / len(batches)
    tokens = statistics.fmean(int(b["n_real_tokens"]) for b in batches)
    return {
        "median_s": {name: statistics.median(ts) for name, ts in times.items()},
        "tokens_per_step": tokens,
        "ops_per_step": ops,
        "timed_steps": len(times["step"]),
    }


def onednn_totals(log: str) -> dict:
    """Seconds of primitive execution and creation (cache misses and hits) in a ONEDNN_VERBOSE log."""
    out = {"exec_s": 0.0, "exec_calls": 0, "create_miss_s": 0.0, "create_misses": 0, "create_hit_s": 0.0}
    for line in log.splitlines():
        fields = line.split(",")
        if len(fields) < 5 or fields[0] != "onednn_verbose" or fields[2] != "primitive" or fields[3] == "info":
            continue
        event, seconds = fields[3], float(fields[-1]) / 1e3  # e.g. exec, create:cache_miss; the last field is ms
        if event == "exec":
            out["exec_s"] += seconds
            out["exec_calls"] += 1
        elif event == "create:cache_miss":
            out["create_miss_s"] += seconds
            out["create_misses"] += 1
        elif event == "create:cache_hit":
            out["create_hit_s"] += seconds
    return out


def run(variant: str, args, precision: str, onednn: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--precision", precision]
    cmd += ["--batches", str(args.batches), "--passes", str(args.passes)]
    env = {**os.environ, **({"ONEDNN_VERBOSE": "profile_create,profile_exec"} if onednn else {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"the {variant} run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(line[len("RESULT ") :])
    if onednn:
        result["onednn"] = onednn_totals(proc.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10, help="distinct steps, the benchmark's first ones")
    parser.add_argument("--passes", type=int, default=3, help="passes over them; the first is not timed")
    parser.add_argument("--onednn", action="store_true", help="also add up oneDNN's own matmul timings")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=["real", "thin"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child(args.child == "thin", args.batches, args.passes, args.precision, count_ops=True)
        print("RESULT " + json.dumps(result))
        return

    machine = machine_record()
    precision = native_precision(machine)
    print(f"machine: {describe(machine)}; precision {precision}")
    results = {v: run(v, args, precision) for v in ("real", "thin")}
    if args.onednn:
        for v in results:
            verbose = run(v, args, precision, onednn=True)
            steps = args.batches * args.passes + args.batches  # every step the child ran, the counted pass too
            results[v]["onednn_per_step"] = {k: x / steps for k, x in verbose["onednn"].items()}
    print(f"\nmedian ms a step ({results['real']['tokens_per_step']:.0f} tokens), after one pass over the batches")
    print(f"{'model':8s}" + "".join(f"{p:>11s}" for p in PARTS) + f"{'ops/step':>10s}")
    for v, r in results.items():
        cells = "".join(f"{1e3 * r['median_s'][p]:11.0f}" for p in PARTS)
        print(f"{v:8s}{cells}{r['ops_per_step']:10.0f}")
    real, thin = results["real"]["median_s"]["step"], results["thin"]["median_s"]["step"]
    print(f"the thin model's step is {100 * thin / real:.0f}% of the real one's")
    for v, r in results.items():
        if "onednn_per_step" in r:
            o = r["onednn_per_step"]
            print(
                f"{v}: oneDNN executes matmuls {1e3 * o['exec_s']:.0f} ms a step ({o['exec_calls']:.0f} calls); "
                f"creates primitives {1e3 * o['create_miss_s']:.1f} ms a step ({o['create_misses']:.1f} new shapes), "
                f"looks them up {1e3 * o['create_hit_s']:.1f} ms"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": command_line(), "machine": machine, "precision": precision, "args": vars(args)}
    args.out.write_text(json.dumps({**record, "results": results}, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
