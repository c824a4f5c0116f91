"""One AdamW step over full finetuning's parameters: torch's three kernels, side by side on this CPU.

Full finetuning of the default model updates 134.5M fp32 parameters (272 tensors, the tied embedding's 28.3M
among them) every step. torch's AdamW can run the update three ways:

- `for-loop`: one op after another per tensor (torch's default on CPU; HF Trainer's `adamw_torch`);
- `foreach`: the `_foreach_*` ops, which on CPU fall back to the same per-tensor ops, each writing a fresh
  temporary as large as the weight (deltatune's choice on CPU before this benchmark);
- `fused`: one kernel per tensor that reads and writes each element once (`fused=True`; HF Trainer's
  default `adamw_torch_fused` with torch >= 2.8, so TRL's too).

The parameters are the default model's shapes with random gradients; the three optimizers step in turn,
`--repeats` times (the first of each untimed: state allocation), and the table gives the median, the spread and
the ratio against fused. Updates are checked to agree (the largest difference from fused, in units of lr).

    python benchmarks/optimizer_step.py [--repeats 9] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command_line, describe, machine_record  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "optimizer_step.json"
KERNELS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
LR = 2e-5


def model_shapes(model: str | None) -> list[torch.Size]:
    """The trainable tensors of full finetuning (the tied head counted once, as the optimizer sees it)."""
    from deltatune.models import load_model

    loaded, _ = load_model(model, dtype=torch.float32)
    return [p.shape for p in loaded.parameters()]


def make_optimizer(shapes: list[torch.Size], kernel: str, seed: int = 0) -> tuple[torch.optim.Optimizer, list]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, **KERNELS[kernel]), params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    machine = machine_record(measure_peak=False)
    print(describe(machine))
    shapes = model_shapes(args.model)
    n_params = sum(s.numel() for s in shapes)
    runs = {k: make_optimizer(shapes, k) for k in KERNELS}
    times: dict[str, list[float]] = {k: [] for k in KERNELS}
    for rep in range(args.repeats + 1):
        for kernel, (opt, _) in runs.items():
            start = time.perf_counter()
            opt.step()
            if rep:  # the first step allocates the moments
                times[kernel].append(time.perf_counter() - start)
    reference = runs["fused"][1]
    agree = {
        k: max(((p - r).abs().max().item() for p, r in zip(params, reference)), default=0.0) / LR
        for k, (_, params) in runs.items()
    }
    fused = statistics.median(times["fused"])
    rows = [
        {
            "kernel": k,
            "median_ms": round(statistics.median(t) * 1e3, 1),
            "spread_pct": round(100 * (max(t) - min(t)) / statistics.median(t), 1),
            "x_fused": round(statistics.median(t) / fused, 2),
            "max_diff_from_fused_in_lr": agree[k],
        }
        for k, t in times.items()
    ]
    print(f"\n{len(shapes)} tensors, {n_params / 1e6:.1f}M fp32 parameters, median of {args.repeats} steps")
    print("| kernel | ms a step | spread | time / fused | largest difference from fused (x lr) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['kernel']} | {r['median_ms']:.0f} | {r['spread_pct']:.0f}% | {r['x_fused']:.2f} "
            f"| {r['max_diff_from_fused_in_lr']:.1e} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": command_line(), "machine": machine, "parameters": n_params, "rows": rows, "times_s": times}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
