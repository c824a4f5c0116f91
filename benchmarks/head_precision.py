"""The LM head's precision in a bf16 full-finetuning step: fp32 (as it ran until 2026-12-07) against bf16.

The chunked loss (deltatune/train/loss.py) runs outside autocast and took the final hidden state's dtype as its
compute dtype. Full finetuning keeps fp32 master weights, so under bf16 autocast that hidden state is fp32, and
the head's three vocabulary-sized products (logits, the hidden state's gradient, the tied weight's gradient) ran
in fp32 while every other linear ran in bf16, and the lean loop's head too (it runs under autocast). The loop now
gives the head autocast's dtype; LoRA is unchanged (its frozen head is bf16 either way). Each run is
`train_speed.py`'s contender in its own process, the two variants interleaved; the table gives tokens/s, each
pair's ratio (bf16 head over fp32 head) and peak RSS.

    python benchmarks/head_precision.py [--contenders deltatune-full,deltatune] [--repeats 3] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command_line, describe, machine_record  # noqa: E402
from pairs import benchmark_context, print_pairs, run_pairs  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contenders", default="deltatune-full,deltatune", help="train_speed.py contender names")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "head_precision.json")
    args = parser.parse_args()

    machine = machine_record()
    print(describe(machine))
    ctx, tokens = benchmark_context(args.steps, args.warmup)
    variants = {"fp32 head": ({**ctx, "fp32_head": True}, None), "bf16 head": (ctx, None)}
    rows = run_pairs(args.contenders.split(","), variants, args.repeats, tokens)
    print_pairs(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": command_line(), "machine": machine, "tokens": tokens, "rows": rows}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
