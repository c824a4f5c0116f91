"""LoRA with the update merged into the weight at every forward: y = x (W0 + s B A)^T, a lever measured, not built.

The idea: one product with the merged weight instead of the base product plus LoRA's two thin ones and the
additions of their full-size outputs (n x out forward, n x in for the input gradient); backward needs only
the merged weight again, x A^T and g B for A's and B's gradients. Two questions decide it:

1. **Numerics.** In bf16 (precision auto on these CPUs) the merged weight is rounded to W0's bf16 grid, and a
   LoRA update is small next to W0: the step's forward would see the update rounded. The script trains the
   main benchmark's LoRA run (`train_speed.py`'s deltatune contender: default model, GSM8K, r=8 alpha 16,
   lr 2e-4, 4 rows of 256 a step) for `--steps` steps, then for every adapted matrix compares
   bf16(W0 + s B A) - W0 with s B A in float32: the relative error of the update the forward would apply,
   and the share of the update's entries rounded to nothing.
2. **Speed.** Forward and backward of one adapted linear at the step's ~800 tokens and the default model's
   shapes: the layer as built (base product, then `addmm` of the thin product into it) against a merged
   autograd function (W0 + s B A formed in forward and again in backward), interleaved, median of
   `--repeats` x 30 calls.

    python benchmarks/lora_merged_forward.py [--steps 12] [--repeats 5] [--tokens 800] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command_line, describe, machine_record  # noqa: E402

HERE = Path(__file__).resolve().parent
SHAPES = {"q, o": (576, 576), "k, v": (576, 192), "gate, up": (576, 1536), "down": (1536, 576)}  # (in, out)


class MergedLoRA(torch.autograd.Function):
    """y = x (W0 + s B A)^T with the merged weight formed in forward and again in backward (not kept)."""

    @staticmethod
    def forward(ctx, x, w, a, b, s):
        merged = torch.addmm(w, b, a, alpha=s)
        h = x @ a.T
        ctx.save_for_backward(x, h, w, a, b)
        ctx.s = s
        return x @ merged.T

    @staticmethod
    def backward(ctx, g):
        x, h, w, a, b = ctx.saved_tensors
        g2, x2, h2 = (t.reshape(-1, t.shape[-1]) for t in (g, x, h))
        grad_x = g @ torch.addmm(w, b, a, alpha=ctx.s)
        gb = g2 @ b
        return grad_x, None, (gb.T @ x2) * ctx.s, (g2.T @ h2) * ctx.s, None


def as_built(x, w, a, b, s):
    """deltatune's LoRALinear forward (deltatune/methods/lora.py) for these operands."""
    base = F.linear(x, w)
    h = F.linear(x, a)
    return torch.addmm(base.reshape(-1, base.shape[-1]), h.reshape(-1, h.shape[-1]), b.T, alpha=s).view(base.shape)


def merged(x, w, a, b, s):
    return MergedLoRA.apply(x, w, a, b, s)


def time_layer(fn, tokens: int, d_in: int, d_out: int, calls: int = 30) -> float:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(d_out, d_in, generator=g).mul_(0.04).bfloat16()
    a = torch.randn(8, d_in, generator=g).mul_(0.04).bfloat16().requires_grad_()
    b = torch.randn(d_out, 8, generator=g).mul_(0.01).bfloat16().requires_grad_()
    x = torch.randn(1, tokens, d_in, generator=g).bfloat16().requires_grad_()
    grad = torch.randn(1, tokens, d_out, generator=g).bfloat16()
    for _ in range(3):
        fn(x, w, a, b, 2.0).backward(grad)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(x, w, a, b, 2.0).backward(grad)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(tokens: int, repeats: int) -> list[dict]:
    rows = []
    for name, (d_in, d_out) in SHAPES.items():
        built, fused = [], []
        for _ in range(repeats):  # interleaved: a slow minute falls on both
            built.append(time_layer(as_built, tokens, d_in, d_out))
            fused.append(time_layer(merged, tokens, d_in, d_out))
        rows.append(
            {
                "layers": name,
                "in": d_in,
                "out": d_out,
                "as_built_ms": statistics.median(built) * 1e3,
                "merged_ms": statistics.median(fused) * 1e3,
                "pair_speedups": [round(p / q, 3) for p, q in zip(built, fused)],
            }
        )
    return rows


@torch.no_grad()
def numerics(steps: int) -> dict:
    """Train the main benchmark's LoRA run for `steps` steps, then measure what a bf16 merge keeps of each update."""
    from train_speed import deltatune_config, examples_of, resolve_precision

    import deltatune
    from deltatune.models import default_model_dir, load_tokenizer
    from deltatune.train.loop import train

    model_dir = str(default_model_dir())
    ctx = {"model": model_dir, "examples": steps * 4}
    records, _, _ = examples_of(ctx, load_tokenizer(model_dir))
    out = tempfile.mkdtemp(prefix="bench-merged-")
    train(
        deltatune_config(model_dir, "lora", steps, out, precision=resolve_precision("auto")),
        quiet=True,
        records=records,
    )
    model, _ = deltatune.load_model(model_dir, dtype="bf16")
    adapted = deltatune.load_adapter(model, Path(out) / "final")
    errors, zeroed, by_type = [], [], {}
    for name, module in adapted.model.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        w0 = module.base.weight.detach()
        delta = module.delta_weight()  # float32 s B A
        applied = torch.addmm(w0, module.lora_B.weight.detach(), module.lora_A.weight.detach(), alpha=module.scaling)
        kept = applied.float() - w0.float()
        error = float((kept - delta).norm() / delta.norm())
        lost = float(((kept == 0) & (delta != 0)).float().mean())
        errors.append(error)
        zeroed.append(lost)
        by_type.setdefault(name.rsplit(".", 1)[-1], []).append((error, lost))
    return {
        "steps": steps,
        "matrices": len(errors),
        "relative_error_median": statistics.median(errors),
        "relative_error_max": max(errors),
        "entries_rounded_to_nothing_median": statistics.median(zeroed),
        "by_type": {
            t: {
                "relative_error_median": statistics.median(e for e, _ in v),
                "entries_rounded_to_nothing_median": statistics.median(z for _, z in v),
            }
            for t, v in sorted(by_type.items())
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=800)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "lora_merged_forward.json")
    args = parser.parse_args()
    machine = machine_record()
    print(describe(machine))
    num = numerics(args.steps)
    print(
        f"\nafter {num['steps']} steps, {num['matrices']} adapted matrices: the update a bf16 merged weight applies "
        f"differs from s B A by {num['relative_error_median']:.1%} (median; max {num['relative_error_max']:.1%}), "
        f"{num['entries_rounded_to_nothing_median']:.1%} of its entries rounded to nothing"
    )
    for t, v in num["by_type"].items():
        print(
            f"  {t:10s} error {v['relative_error_median']:.1%}, rounded to nothing {v['entries_rounded_to_nothing_median']:.1%}"
        )
    rows = speed(args.tokens, args.repeats)
    print(f"\nforward + backward of one adapted linear, {args.tokens} tokens, bf16 (ms, median):")
    print(f"{'layers':10s} {'in x out':>11s} {'as built':>9s} {'merged':>8s} {'speed-up':>9s}  pairs")
    for r in rows:
        print(
            f"{r['layers']:10s} {r['in']:>5d} x {r['out']:<5d} {r['as_built_ms']:9.3f} {r['merged_ms']:8.3f} "
            f"{r['as_built_ms'] / r['merged_ms']:9.2f}  {r['pair_speedups']}"
        )
    result = {"command": command_line(), "machine": machine, "numerics": num, "tokens": args.tokens, "speed": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
