"""Every matrix product of a real training step, timed as it runs, against the same call replayed alone.

`profile_step.py --shapes` compares the profiler's self time per shape with a contiguous product timed alone;
this times each `aten::mm` / `aten::addmm` call of the main benchmark's LoRA step with a clock around the call
itself (a `TorchDispatchMode` over the training loop, active after `--warmup` steps), and replays every distinct
call (shapes *and* strides, so a transposed operand is replayed transposed) alone on fresh operands, warm. The
table gives, per call signature, the step's median time against the replay's, and the sum: how much of the step is
matrix products, and how much slower than alone they run inside it.

Code under torch.compile runs eagerly while a dispatch mode is active, so the step is the eager one (the compiled
RMSNorm included) and there is no compiled variant; the clock also adds its own cost to every operator, so the
step's time here is longer than without it (the products' times are not affected: each is timed around its call).

    python benchmarks/step_products.py [--warmup 2] [--steps 3] [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command_line, describe, machine_record, seconds_per_call  # noqa: E402
from train_speed import BATCH, benchmark_data, deltatune_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "step_products.json"
PRODUCTS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)


class ProductClock(TorchDispatchMode):
    """Times each product call while `on`, keyed by (op, dtype, every tensor argument's shape and strides)."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False
        self.calls: dict[tuple, list[float]] = collections.defaultdict(list)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not (self.on and func in PRODUCTS):
            return func(*args, **kwargs)
        start = time.perf_counter()
        out = func(*args, **kwargs)
        elapsed = time.perf_counter() - start
        tensors = tuple((tuple(a.shape), tuple(a.stride())) for a in args if isinstance(a, torch.Tensor))
        self.calls[(func, out.dtype, tensors)].append(elapsed)
        return out


def replay(func, dtype: torch.dtype, tensors: tuple, repeats: int = 5, iters: int = 5) -> float:
    """The call alone, on fresh operands with the recorded shapes and strides: median seconds a call."""
    operands = []
    for shape, stride in tensors:
        extent = 1 + sum((s - 1) * st for s, st in zip(shape, stride))
        operands.append(torch.randn(extent, dtype=dtype).as_strided(shape, stride))
    for _ in range(3):
        func(*operands)
    return statistics.median(seconds_per_call(lambda: func(*operands), iters) for _ in range(repeats))


def signature(func, tensors: tuple) -> str:
    name = "addmm" if func is torch.ops.aten.addmm.default else "mm"
    parts = [f"{list(shape)}" + ("" if _contiguous(shape, stride) else " (strided)") for shape, stride in tensors]
    return f"{name} " + " ; ".join(parts)


def _contiguous(shape: tuple, stride: tuple) -> bool:
    expected, out = 1, []
    for size in reversed(shape):
        out.append(expected)
        expected *= size
    return tuple(reversed(out)) == tuple(stride)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")

    from deltatune.models import default_model_dir, load_tokenizer
    from deltatune.train.loop import train

    machine = machine_record()
    print(f"machine: {describe(machine)}")
    model = args.model or str(default_model_dir())
    records, _, _ = benchmark_data(load_tokenizer(model), (args.warmup + args.steps) * BATCH)
    scratch = tempfile.TemporaryDirectory(prefix="step-products-")  # the run's folder, removed at exit
    cfg = deltatune_config(model, "lora", args.warmup + args.steps, str(Path(scratch.name) / "run"))
    clock = ProductClock()
    step_ends: list[float] = []

    def on_step(step: int, total: int, model) -> None:  # called after optimizer step `step`
        clock.on = step >= args.warmup
        step_ends.append(time.perf_counter())

    with clock:
        train(cfg, quiet=True, records=records, on_step=on_step)
    step_s = (step_ends[-1] - step_ends[args.warmup - 1]) / args.steps
    rows = []
    for (func, dtype, tensors), times in clock.calls.items():
        alone = replay(func, dtype, tensors)
        rows.append(
            {
                "call": signature(func, tensors),
                "calls_per_step": len(times) / args.steps,
                "step_ms": 1e3 * sum(times) / args.steps,
                "median_ms": 1e3 * statistics.median(times),
                "alone_ms": 1e3 * alone,
                "alone_step_ms": 1e3 * alone * len(times) / args.steps,
            }
        )
    rows.sort(key=lambda r: -r["step_ms"])
    in_step = sum(r["step_ms"] for r in rows)
    alone = sum(r["alone_step_ms"] for r in rows)
    print(
        f"\n{args.steps} steps of {1e3 * step_s:.0f} ms (the clock's own cost included): products {in_step:.0f} ms a "
        f"step ({100 * in_step / (1e3 * step_s):.0f}%), the same calls alone {alone:.0f} ms ({in_step / alone:.2f}x)"
    )
    print(f"{'ms/step':>8s} {'calls':>6s} {'median':>8s} {'alone':>8s} {'ratio':>6s}  call")
    for r in rows[: args.top]:
        ratio = r["median_ms"] / r["alone_ms"]
        print(
            f"{r['step_ms']:8.1f} {r['calls_per_step']:6.1f} {r['median_ms']:8.3f} {r['alone_ms']:8.3f} "
            f"{ratio:6.2f}  {r['call']}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "command": command_line(),
                "machine": machine,
                "config": {k: getattr(args, k) for k in ("warmup", "steps")},
                "step_ms": 1e3 * step_s,
                "products_ms": in_step,
                "products_alone_ms": alone,
                "calls": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
