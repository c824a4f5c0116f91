"""deltatune's span attention against PyTorch's own CPU attention kernels, example by example.

Packed training runs each example's causal attention on its own span of the row. `SpanAttention`
(deltatune/train/packed_attention.py) does it with a few batched matmuls per span and recomputes the
probabilities in backward; PyTorch's `scaled_dot_product_attention(..., is_causal=True)` on each span takes
its CPU flash kernel (tiled, online softmax, brgemm where the CPU has AMX). Which is faster depends on the
CPU kind, so this measures both at SmolLM2-135M's attention shapes (9 query heads, 3 key/value heads, head
size 64) in the training precision: forward and backward of one packed row, interleaved, medians, and the
three outputs against each other in float64.

- `span`: SpanAttention, the packed path's kernel, recomputing the probabilities in backward;
- `span_keep`: the same with `KEEP_PROBABILITIES = 256` (spans of up to 256 tokens keep their probabilities
  from forward to backward);
- `sdpa_gqa`: SDPA per span with `enable_gqa=True` (keys and values shared by 3 query heads each);
- `sdpa_repeat`: SDPA per span with the keys and values repeated to 9 heads first.

The default spans are four GSM8K-sized examples (the main benchmark's rows hold 129-256 tokens each).

    python benchmarks/span_attention_kernels.py [--lengths 201,183,229,164] [--iters 10] [--repeats 9]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command_line, describe, machine_record, native_precision  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "span_attention_kernels.json"
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def spans_of(lengths: list[int]) -> list[tuple[int, int]]:
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    return [(s, s + n) for s, n in zip(starts, lengths)]


def attention(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans) -> torch.Tensor:
    """q [H, T, D], k/v [KV, T, D] -> [T, H, D], causal within each span."""
    from deltatune.train import packed_attention

    if name in ("span", "span_keep"):
        packed_attention.KEEP_PROBABILITIES = 256 if name == "span_keep" else 0
        return packed_attention.SpanAttention.apply(q, k, v, spans, HEAD_DIM**-0.5)
    if name == "sdpa_repeat":
        k, v = k.repeat_interleave(HEADS // KV_HEADS, 0), v.repeat_interleave(HEADS // KV_HEADS, 0)
    gqa = name == "sdpa_gqa"
    outs = [
        F.scaled_dot_product_attention(
            q[None, :, s:e], k[None, :, s:e], v[None, :, s:e], is_causal=True, enable_gqa=gqa
        )
        for s, e in spans
    ]
    return torch.cat([o[0].transpose(0, 1) for o in outs])


def make_step(name: str, inputs: tuple[torch.Tensor, ...], grad: torch.Tensor, spans):
    def step() -> None:
        q, k, v = (x.detach().requires_grad_() for x in inputs)
        attention(name, q, k, v, spans).backward(grad)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="201,183,229,164", help="span lengths of the packed row")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    machine = machine_record()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[native_precision(machine)]
    print(describe(machine))
    lengths = [int(n) for n in args.lengths.split(",")]
    spans, total = spans_of(lengths), sum(lengths)
    gen = torch.Generator().manual_seed(0)
    shapes = ((HEADS, total, HEAD_DIM), (KV_HEADS, total, HEAD_DIM), (KV_HEADS, total, HEAD_DIM))
    inputs = tuple(torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes)
    grad = torch.randn(total, HEADS, HEAD_DIM, generator=gen, dtype=torch.float64)
    names = ("span", "span_keep", "sdpa_gqa", "sdpa_repeat")

    with torch.no_grad():  # the three agree in float64 before anything is timed
        reference = attention("span", *inputs, spans)
        max_diff = {n: float((attention(n, *inputs, spans) - reference).abs().max()) for n in names}
    assert all(d < 1e-10 for d in max_diff.values()), max_diff

    steps = {n: make_step(n, tuple(x.to(dtype) for x in inputs), grad.to(dtype), spans) for n in names}
    for step in steps.values():
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):
        for n, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.iters):
                step()
            times[n].append((time.perf_counter() - start) / args.iters)
    span_ms = statistics.median(times["span"]) * 1e3
    rows = []
    print(f"\nspans {lengths} ({total} tokens), {native_precision(machine)}, median of {args.repeats} x {args.iters}")
    print("| kernel | forward + backward ms | spread | time / span | float64 max difference |")
    print("|---|---:|---:|---:|---:|")
    for n in names:
        ms = statistics.median(times[n]) * 1e3
        spread = 100 * (max(times[n]) - min(times[n])) / statistics.median(times[n])
        rows.append({"kernel": n, "ms": round(ms, 3), "spread_pct": round(spread, 1), "max_diff_fp64": max_diff[n]})
        print(f"| {n} | {ms:.2f} | {spread:.0f}% | {ms / span_ms:.2f} | {max_diff[n]:.1e} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": command_line(), "machine": machine, "lengths": lengths, "rows": rows}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
