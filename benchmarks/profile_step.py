"""Where a training step's time goes: torch's profiler over a few steps of the main benchmark's run.

The deltatune contender of train_speed.py (SmolLM2-135M, GSM8K, chat template, response-only loss,
LoRA r=8 on all linear layers, precision auto, the CPU defaults) trains for `--warmup` steps unprofiled (the
compiled norms' first-step work, oneDNN's kernel building), then `--steps` steps under the profiler.
Prints the operators by self CPU time with their call counts, and the share of the matmuls, copies
and casts, element-wise work and attention; writes the table as JSON. Every profile figure quoted in
docs/benchmarks.md comes from this command.

    python benchmarks/profile_step.py [--steps 8] [--warmup 2] [--method lora] [--attention auto] [--top 25]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, machine_record  # noqa: E402
from train_speed import ALPHA, BATCH, MAX_LEN, RANK, benchmark_data  # noqa: E402

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
    "optimizer": ("Optimizer.step", "aten::_foreach"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "profile_step.json"))
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile, schedule

    from deltatune.config import TrainConfig
    from deltatune.models import load_tokenizer
    from deltatune.train.loop import train

    machine = machine_record()
    print(f"machine: {describe(machine)}")
    prof = profile(
        activities=[ProfilerActivity.CPU],
        record_shapes=False,
        schedule=schedule(wait=0, warmup=args.warmup, active=args.steps, repeat=1),
    )

    def profile_step(step: int, total: int, model) -> None:  # one profiler step per optimizer step
        prof.step()

    records, _, _ = benchmark_data(load_tokenizer(args.model), (args.warmup + args.steps) * BATCH)
    cfg = TrainConfig(
        model=args.model,
        template="chatml",
        policy="response",
        method=args.method,
        rank=RANK,
        alpha=ALPHA,
        dropout=0.0,
        lr=2e-4,
        schedule="constant",
        steps=args.warmup + args.steps,
        batch_size=BATCH,
        seq_len=MAX_LEN,
        precision="auto",
        attention=args.attention,
        output=tempfile.mkdtemp(prefix="profile-"),
        eval_fraction=0.0,
        warmup_steps=0,
        log_every=1000,
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
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "machine": machine,
                "config": {k: getattr(args, k) for k in ("steps", "warmup", "method", "attention")},
                "total_self_s": total_us / 1e6,
                "parts_s": parts,
                "ops": rows[:100],
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
