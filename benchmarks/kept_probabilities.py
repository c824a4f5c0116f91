"""Does keeping the attention probabilities for backward speed up training? `KEEP_PROBABILITIES` 0 against 256.

The packed path's `SpanAttention` (deltatune/train/packed_attention.py) saves only q, k and v, and its backward
recomputes each span's probabilities (a product, the causal mask and the softmax). With
`KEEP_PROBABILITIES = 256`, spans of up to 256 tokens keep them from forward instead: bitwise the same
gradients, one product and two passes less a span in backward, for heads x m x m more numbers saved a span.
Each run is `train_speed.py`'s deltatune contender (LoRA r=8 on the main benchmark's GSM8K steps, examples of
129-256 tokens) in its own process, recompute and keep interleaved; the table gives tokens/s, each pair's ratio
and peak RSS.

    python benchmarks/kept_probabilities.py [--contenders deltatune] [--repeats 3] [--steps 12] [--warmup 2]
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
    parser.add_argument("--contenders", default="deltatune", help="train_speed.py contender names")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--keep", type=int, default=256, help="KEEP_PROBABILITIES of the 'keep' variant")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "kept_probabilities.json")
    args = parser.parse_args()

    machine = machine_record()
    print(describe(machine))
    ctx, tokens = benchmark_context(args.steps, args.warmup)
    variants = {
        "recompute": ({**ctx, "keep_probabilities": 0}, None),
        "keep": ({**ctx, "keep_probabilities": args.keep}, None),
    }
    rows = run_pairs(args.contenders.split(","), variants, args.repeats, tokens)
    print_pairs(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": command_line(), "machine": machine, "keep": args.keep, "tokens": tokens, "rows": rows}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
