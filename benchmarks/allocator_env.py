"""Does glibc keeping freed memory speed up training? deltatune's contenders with `keep_freed_memory` off and on.

A full-finetuning step of the default model allocates and frees vocabulary-sized tensors (the tied head's and
embedding's gradients, 113 MB each in fp32) and hundreds of weight casts. glibc returns large blocks to the
kernel on free (mmap above its threshold, heap trimming), so every step page-faults the same memory back in:
about 110k faults a step. Training now tells glibc to keep it (`deltatune/train/host_memory.py`, glibc's
`mallopt`, on by default on CPU); `--env` measures the older way instead, the same two settings through
`GLIBC_TUNABLES` in the environment with the option off. `--thp` measures PyTorch's transparent huge pages
for its CPU tensors instead (`THP_MEM_ALLOC_ENABLE=1`: allocations of 2 MB and more aligned and madvised as huge
pages, 512 times fewer page faults for the same memory), with the option at its default. `--vars K=V,...` measures
any other environment (OpenMP's wait policy or thread binding, say) against none, the option at its default. Each
run is
`train_speed.py`'s contender in its own process, off and on interleaved; the table gives tokens/s, the ratio of
each pair and peak RSS.

    python benchmarks/allocator_env.py [--contenders deltatune-full,deltatune] [--repeats 3] [--steps 12]
                                       [--env | --thp | --vars K=V,...]
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
TUNABLES = {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"}
HUGE_PAGES = {"THP_MEM_ALLOC_ENABLE": "1"}


def parse_vars(parser: argparse.ArgumentParser, text: str) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in text.split(",")]
    if any(len(p) != 2 or not p[0] for p in pairs):
        parser.error(f"--vars: expected K=V,K=V, got '{text}'")
    return dict(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contenders", default="deltatune-full,deltatune", help="train_speed.py contender names")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--env", action="store_true", help="'on' through GLIBC_TUNABLES instead of the option")
    how.add_argument("--thp", action="store_true", help="'on': PyTorch's huge pages (THP_MEM_ALLOC_ENABLE=1)")
    how.add_argument("--vars", default=None, metavar="K=V,...", help="'on': these environment variables")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "allocator_env.json")
    args = parser.parse_args()
    variables = parse_vars(parser, args.vars) if args.vars is not None else None

    machine = machine_record()
    print(describe(machine))
    ctx, tokens = benchmark_context(args.steps, args.warmup)
    if args.thp or variables:
        off, on = (ctx, None), (ctx, variables or HUGE_PAGES)
    else:
        off = ({**ctx, "keep_freed_memory": "off"}, None)
        on = (off[0], TUNABLES) if args.env else ({**ctx, "keep_freed_memory": "on"}, None)
    rows = run_pairs(args.contenders.split(","), {"off": off, "on": on}, args.repeats, tokens)
    print_pairs(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    how = f"environment {TUNABLES}" if args.env else "keep_freed_memory: on (mallopt)"
    if args.thp or variables:
        how = f"environment {variables or HUGE_PAGES}, keep_freed_memory at its default"
    record = {"command": command_line(), "machine": machine, "on": how, "tokens": tokens, "rows": rows}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
