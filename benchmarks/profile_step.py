"""Where a training step's time goes: torch's profiler over a few steps of the main benchmark's run.

The deltatune contender of train_speed.py (SmolLM2-135M, GSM8K, chat template, response-only loss,
LoRA r=8 on all linear layers, precision auto, the CPU defaults) trains for `--warmup` steps unprofiled (the
compiled norms' first-step work, oneDNN's kernel building), then `--steps` steps under the profiler.
Prints the operators by self CPU time with their call counts, and the share of the matmuls, copies
and casts, element-wise work and attention; writes the table as JSON. Every profile figure quoted in
docs/benchmarks.md comes from this command.

With `--shapes` it also lists the matrix products by shape: their time in the step against the same product
timed alone (contiguous operands, warm cache: `roofline.py`'s timing), so a product that runs far below its
isolated speed inside the step (a transposed operand, a cold cache, a layout oneDNN reorders) shows by name.

    python benchmarks/profile_step.py [--steps 8] [--warmup 2] [--method lora] [--attention auto] [--top 25]
                                      [--shapes] [--compile-layers]

With `--compile-layers` the decoder layers run compiled (give it `--warmup 3`: the compilation falls in the first
step); inductor's fused kernels then appear under their generated names (`cpp_fused_...`) where the profiler sees
them, and in the "compiled graphs" part.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command_line, describe, machine_record, native_precision  # noqa: E402
from train_speed import BATCH, benchmark_data, deltatune_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GROUPS = {  # operator name prefixes -> a coarse part of the step
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"),
    "copies and casts": (
        "aten::copy_",
        "aten::to",
        "aten::_to_copy",
        "aten::contiguous",
        "aten::clone",
        "aten::index_select",
        "aten::cat",
    ),
    "element-wise": (
        "aten::mul",
        "aten::add",
        "aten::sub",
        "aten::div",
        "aten::silu",
        "aten::neg",
        "aten::pow",
        "aten::rsqrt",
        "aten::mean",
        "aten::sum",
        "aten::exp",
        "aten::fill_",
        "aten::zero_",
    ),
    "attention": ("SpanAttention", "aten::_scaled_dot_product", "aten::softmax", "aten::_softmax"),
    "optimizer": ("Optimizer.step", "aten::_foreach", "aten::_fused_adam"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--shapes", action="store_true", help="matmuls by shape, in the step against alone")
    parser.add_argument(
        "--compile-layers", action="store_true", help="compiled decoder layers (what runs of 500k+ tokens get)"
    )
    parser.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "profile_step.json"))
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile, schedule

    from deltatune.models import load_tokenizer
    from deltatune.train.loop import train

    machine = machine_record()
    print(f"machine: {describe(machine)}")
    prof = profile(
        activities=[ProfilerActivity.CPU],
        record_shapes=args.shapes,
        schedule=schedule(wait=0, warmup=args.warmup, active=args.steps, repeat=1),
    )

    def profile_step(step: int, total: int, model) -> None:  # one profiler step per optimizer step
        prof.step()

    records, _, _ = benchmark_data(load_tokenizer(args.model), (args.warmup + args.steps) * BATCH)
    cfg = deltatune_config(
        args.model,
        args.method,
        args.warmup + args.steps,
        tempfile.mkdtemp(prefix="profile-"),
        attention=args.attention,
        compile_layers=args.compile_layers,
    )
    with prof:
        result = train(cfg, quiet=True, records=records, on_step=profile_step)
    events = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)
    rows = sorted(
        ({"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in events),
        key=lambda r: -r["self_s"],
    )
    parts = {name: 0.0 for name in GROUPS}
    for r in rows:
        for name, prefixes in GROUPS.items():
            if r["op"].startswith(prefixes):
                parts[name] += r["self_s"]
                break
    print(
        f"\n{args.steps} profiled steps, {total_us / 1e6:.1f} s of self CPU time "
        f"({result.tokens_per_s:.0f} tokens/s over the whole run, profiler overhead included)"
    )
    print(f"{'operator':46s}{'self s':>9s}{'share':>8s}{'calls':>9s}")
    for r in rows[: args.top]:
        print(f"{r['op'][:45]:46s}{r['self_s']:9.2f}{100 * r['self_s'] * 1e6 / total_us:7.1f}%{r['calls']:9d}")
    print("\nby part:")
    for name, s in parts.items():
        print(f"  {name:18s}{s:8.2f} s {100 * s * 1e6 / total_us:6.1f}%")
    by_shape = matmul_shapes(prof, args.steps, native_precision(machine)) if args.shapes else []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "command": command_line(),
                "machine": machine,
                "config": {k: getattr(args, k) for k in ("steps", "warmup", "method", "attention", "compile_layers")},
                "total_self_s": total_us / 1e6,
                "parts_s": parts,
                "ops": rows[:100],
                "matmul_shapes": by_shape,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


def _mnkb(op: str, shapes: list) -> tuple[int, int, int, int] | None:
    """(m, k, n, batch) of a recorded product, from the profiler's input shapes."""
    if op == "aten::mm" and len(shapes) >= 2 and len(shapes[0]) == 2:
        (m, k), (_, n) = shapes[0], shapes[1]
        return m, k, n, 1
    if op == "aten::addmm" and len(shapes) >= 3 and len(shapes[1]) == 2:
        (m, k), (_, n) = shapes[1], shapes[2]
        return m, k, n, 1
    if op in ("aten::bmm", "aten::baddbmm") and len(shapes) >= 2:
        a, b = (shapes[1], shapes[2]) if op == "aten::baddbmm" else (shapes[0], shapes[1])
        if len(a) == 3 and len(b) == 3:
            return a[1], a[2], b[2], a[0]
    return None


def matmul_shapes(prof, steps: int, precision: str, top: int = 25) -> list[dict]:
    """The products that take most time per step, each against the same product timed alone."""
    import torch
    from roofline import time_product

    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        shape = _mnkb(e.key, e.input_shapes)
        if shape is None:
            continue
        m, k, n, b = shape
        rows.append(
            {
                "op": e.key,
                "m": m,
                "k": k,
                "n": n,
                "batch": b,
                "calls_per_step": e.count / steps,
                "step_s": e.self_cpu_time_total / 1e6 / steps,
                "gflop_per_step": 2 * m * k * n * b * e.count / steps / 1e9,
            }
        )
    rows = sorted(rows, key=lambda r: -r["step_s"])[:top]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # what precision "auto" trains in here
    print(f"\nmatmuls by shape, per step (alone: contiguous {dtype}, warm cache, median of 5)")
    print(
        f"{'op':12s}{'m x k x n (batch)':>26s}{'calls':>7s}{'in step ms':>12s}{'alone ms':>10s}{'ratio':>7s}{'GFLOP/s':>9s}"
    )
    for r in rows:
        alone = time_product(r["m"], r["k"], r["n"], r["batch"], 5, dtype) * r["calls_per_step"]
        r["alone_s"] = alone
        dims = f"{r['m']}x{r['k']}x{r['n']}" + (f" ({r['batch']})" if r["batch"] > 1 else "")
        print(
            f"{r['op'][6:]:12s}{dims:>26s}{r['calls_per_step']:7.0f}{1e3 * r['step_s']:12.1f}{1e3 * alone:10.1f}"
            f"{r['step_s'] / max(alone, 1e-9):7.2f}{r['gflop_per_step'] / max(r['step_s'], 1e-9):9.0f}"
        )
    return rows


if __name__ == "__main__":
    main()
