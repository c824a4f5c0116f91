"""deltatune's span attention against PyTorch's own CPU attention kernels, example by example.

Packed training runs each example's causal attention on its own span of the row. `SpanAttention`
(deltatune/train/packed_attention.py) does it with a few batched matmuls per span and recomputes the
probabilities in backward; PyTorch's `scaled_dot_product_attention(..., is_causal=True)` on each span takes
its CPU flash kernel (tiled, online softmax, brgemm where the CPU has AMX). Which is faster depends on the
CPU kind, so this measures both at SmolLM2-135M's attention shapes (9 query heads, 3 key/value heads, head
size 64) in the training precision: forward and backward of one packed row, interleaved, medians, and the
kernels' outputs and gradients against each other in float64.

- `span`: SpanAttention, the packed path's kernel, recomputing the probabilities in backward;
- `span_keep`: the same with `KEEP_PROBABILITIES = 256` (spans of up to 256 tokens keep their probabilities
  from forward to backward);
- `sdpa_gqa`: SDPA per span with `enable_gqa=True` (keys and values shared by 3 query heads each);
- `sdpa_repeat`: SDPA per span with the keys and values repeated to 9 heads first;
- `padded`: every span of the row padded to the longest (tiled) and all of them done at once by the same
  few products (`PaddedSpanAttention` below, probabilities kept): a handful of operators a layer instead of a
  handful a span, for more softmax work on the padding and batches too big for the cache (spans up to 256).

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


class PaddedSpanAttention(torch.autograd.Function):
    """All spans in one batch [S * KV, G * M, D], each padded to M rows (the longest, tiled): padded keys sit
    after every real query (the causal mask hides them), padded query rows get no gradient (zeroed)."""

    @staticmethod
    def layout(spans, device):
        from deltatune.train.packed_attention import TILE

        m = -(-max(e - s for s, e in spans) // TILE) * TILE
        rows = [list(range(s, e)) + [s] * (m - (e - s)) for s, e in spans]  # padding repeats the first token
        real = [i * m + j for i, (s, e) in enumerate(spans) for j in range(e - s)]  # padded row of each token
        return m, torch.tensor(rows, device=device).flatten(), torch.tensor(real, device=device)

    @staticmethod
    def gather(x, index, spans_n, m, kv_heads):
        """x [heads, T, D] -> [S * KV, G * m, D], contiguous."""
        heads, _, d = x.shape
        rows = x.transpose(0, 1).index_select(0, index).view(spans_n, m, kv_heads, heads // kv_heads, d)
        return rows.permute(0, 2, 3, 1, 4).reshape(spans_n * kv_heads, -1, d)

    @staticmethod
    def scatter(x, real, spans_n, m, kv_heads):
        """[S * KV, G * m, D] -> the real rows [T, heads, D]."""
        d = x.shape[-1]
        rows = x.view(spans_n, kv_heads, -1, m, d).permute(0, 3, 1, 2, 4).reshape(spans_n * m, -1, d)
        return rows.index_select(0, real)

    @staticmethod
    def forward(ctx, q, k, v, spans, scale):
        from deltatune.train.packed_attention import future_mask

        kv, n = k.shape[0], len(spans)
        m, index, real = PaddedSpanAttention.layout(spans, q.device)
        qg = PaddedSpanAttention.gather(q, index, n, m, kv).mul_(scale)
        kg, vg = PaddedSpanAttention.gather(k, index, n, m, kv), PaddedSpanAttention.gather(v, index, n, m, kv)
        scores = torch.bmm(qg, kg.transpose(1, 2))
        scores.view(n * kv, -1, m, m).add_(future_mask(m, scores.dtype, scores.device))
        probs = torch.softmax(scores, -1)
        ctx.save_for_backward(qg, kg, vg, probs, real)
        ctx.shape, ctx.scale = (n, m, kv), scale
        return PaddedSpanAttention.scatter(torch.bmm(probs, vg), real, n, m, kv)

    @staticmethod
    def backward(ctx, grad_out):
        qg, kg, vg, probs, real = ctx.saved_tensors
        (n, m, kv), d = ctx.shape, grad_out.shape[-1]
        rows = grad_out.new_zeros(n * m, grad_out.shape[1], d)  # padded query rows: no gradient
        rows[real] = grad_out
        g = rows.view(n, m, kv, -1, d).permute(0, 2, 3, 1, 4).reshape(n * kv, -1, d)
        grad_v = torch.bmm(probs.transpose(1, 2), g)
        grad_scores = torch._softmax_backward_data(torch.bmm(g, vg.transpose(1, 2)), probs, -1, probs.dtype)
        grad_q = torch.bmm(grad_scores, kg).mul_(ctx.scale)
        grad_k = torch.bmm(grad_scores.transpose(1, 2), qg)
        out = (PaddedSpanAttention.scatter(x, real, n, m, kv).transpose(0, 1) for x in (grad_q, grad_k, grad_v))
        return (*out, None, None)


def attention(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans) -> torch.Tensor:
    """q [H, T, D], k/v [KV, T, D] -> [T, H, D], causal within each span."""
    from deltatune.train import packed_attention

    if name in ("span", "span_keep"):
        packed_attention.KEEP_PROBABILITIES = 256 if name == "span_keep" else 0
        return packed_attention.SpanAttention.apply(q, k, v, spans, HEAD_DIM**-0.5)
    if name == "padded":
        return PaddedSpanAttention.apply(q, k, v, spans, HEAD_DIM**-0.5)
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
    if max(lengths) <= 256:
        names += ("padded",)

    def outputs_and_grads(name: str) -> list[torch.Tensor]:
        q, k, v = (x.detach().requires_grad_() for x in inputs)
        out = attention(name, q, k, v, spans)
        return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad)]

    # the kernels agree in float64, outputs and gradients, before anything is timed
    reference = outputs_and_grads("span")
    max_diff = {n: max(float((a - b).abs().max()) for a, b in zip(outputs_and_grads(n), reference)) for n in names}
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
