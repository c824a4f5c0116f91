"""Would one GEMM for q/k/v and one for gate/up speed up a CPU training step? Measured before building it.

Issue #13 lists fusing the projections that read the same input as a lever: SmolLM2-135M's q, k and v
([576, 576], [192, 576], [192, 576]) become one [960, 576] product and the MLP's gate and up ([1536, 576]
each) one [3072, 576] product. Fewer, larger GEMMs suit oneDNN and AMX better, but the fused forward's outputs
are strided views and its backward must first concatenate the three output gradients (a copy) before the one
input-gradient GEMM; whether that nets a gain is what this measures, at the training step's exact shapes
(`--tokens` rows of the step laid end to end, 1,024 in the main benchmark), in the training precision:

- `lora`: frozen base weights, gradient to the input only (what a LoRA step needs of the base);
- `full`: weight gradients as well (full finetuning).

Each variant is forward + backward through autograd, with the downstream consumer of the outputs (SiLU(gate) *
up, or q/k/v reshaped to heads) so that strided views cost what they cost in the model. Separate and fused run
interleaved, `--repeats` times, each timing `--iters` iterations; the table gives medians and the ratio.

    python benchmarks/fused_projections.py [--tokens 1024] [--iters 20] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command_line, describe, machine_record, native_precision, seconds_per_call  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "fused_projections.json"
HIDDEN, HEAD_DIM = 576, 64
GROUPS = {  # name: output widths of the projections that read the same input
    "q/k/v": (576, 192, 192),
    "gate/up": (1536, 1536),
}


def consume(name: str, outputs: list[torch.Tensor]) -> torch.Tensor:
    """What the decoder does next with the outputs (so strided views pay their real cost)."""
    if name == "gate/up":
        gate, up = outputs
        return torch.nn.functional.silu(gate) * up
    tokens = outputs[0].shape[0]
    heads = [o.view(1, tokens, -1, HEAD_DIM).transpose(1, 2) for o in outputs]
    return sum(h.sum(dim=(1, 2)) for h in heads)  # touches every element through the head layout


def make_step(name: str, fused: bool, tokens: int, weight_grad: bool, dtype: torch.dtype):
    widths = GROUPS[name]
    weights = [torch.randn(w, HIDDEN, dtype=dtype) * HIDDEN**-0.5 for w in widths]
    if fused:
        weights = [torch.cat(weights)]
    for w in weights:
        w.requires_grad_(weight_grad)
    x = torch.randn(tokens, HIDDEN, dtype=dtype, requires_grad=True)

    def step() -> None:
        if fused:
            outputs = list((x @ weights[0].t()).split(widths, dim=-1))
        else:
            outputs = [x @ w.t() for w in weights]
        consume(name, outputs).float().sum().backward()
        x.grad = None
        for w in weights:
            w.grad = None

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    machine = machine_record()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[native_precision(machine)]
    print(describe(machine))
    rows = []
    for name in GROUPS:
        for mode, weight_grad in (("lora", False), ("full", True)):
            steps = {fused: make_step(name, fused, args.tokens, weight_grad, dtype) for fused in (False, True)}
            for step in steps.values():  # warm-up: oneDNN primitive creation, allocator
                seconds_per_call(step, 3)
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.repeats):
                for fused, step in steps.items():
                    times[fused].append(seconds_per_call(step, args.iters))
            separate, fused = statistics.median(times[False]), statistics.median(times[True])
            pair_ratios = sorted(s / f for s, f in zip(times[False], times[True]))
            rows.append(
                {
                    "group": name,
                    "mode": mode,
                    "separate_ms": round(separate * 1e3, 3),
                    "fused_ms": round(fused * 1e3, 3),
                    "speedup": round(separate / fused, 3),
                    "pair_speedups": [round(r, 3) for r in pair_ratios],
                    "saved_ms_per_layer": round((separate - fused) * 1e3, 3),
                }
            )

    print(f"\n{args.tokens} tokens, {machine['matmul_peak_precision']}, median of {args.repeats} x {args.iters}")
    print("| group | step | separate ms | fused ms | speed-up | pairs (min-max) | saved ms a step (30 layers) |")
    print("|---|---|---:|---:|---:|---|---:|")
    for r in rows:
        pairs = f"{r['pair_speedups'][0]:.2f}-{r['pair_speedups'][-1]:.2f}"
        print(
            f"| {r['group']} | {r['mode']} | {r['separate_ms']:.2f} | {r['fused_ms']:.2f} | "
            f"{r['speedup']:.3f} | {pairs} | {30 * r['saved_ms_per_layer']:.1f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": command_line(), "machine": machine, "tokens": args.tokens, "rows": rows}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
