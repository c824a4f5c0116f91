"""Does glibc keeping freed memory speed up training? deltatune's contenders with `keep_freed_memory` off and on.

A full-finetuning step of the default model allocates and frees vocabulary-sized tensors (the tied head's and
embedding's gradients, 113 MB each in fp32) and hundreds of weight casts. glibc returns large blocks to the
kernel on free (mmap above its threshold, heap trimming), so every step page-faults the same memory back in:
about 110k faults a step. Training now tells glibc to keep it (`deltatune/train/host_memory.py`, glibc's
`mallopt`, on by default on CPU); `--env` measures the older way instead, the same two settings through
`GLIBC_TUNABLES` in the environment with the option off. Each run is `train_speed.py`'s contender in its own
process, off and on interleaved; the table gives tokens/s, the ratio of each pair and peak RSS.

    python benchmarks/allocator_env.py [--contenders deltatune-full,deltatune] [--repeats 3] [--steps 12] [--env]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command_line, describe, machine_record, run_child  # noqa: E402

HERE = Path(__file__).resolve().parent
TUNABLES = {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contenders", default="deltatune-full,deltatune", help="train_speed.py contender names")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--env", action="store_true", help="'on' through GLIBC_TUNABLES instead of the option")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "allocator_env.json")
    args = parser.parse_args()

    from train_speed import BATCH, benchmark_data, resolve_precision

    from deltatune.models import default_model_dir, load_tokenizer

    machine = machine_record()
    print(describe(machine))
    model = str(default_model_dir())
    ctx = {
        "model": model,
        "precision": resolve_precision("auto"),
        "steps": args.steps,
        "warmup": args.warmup,
        "examples": (args.steps + args.warmup) * BATCH,
    }
    _, examples, batches = benchmark_data(load_tokenizer(model), ctx["examples"])
    tokens = sum(len(examples[i]) for batch in batches[args.warmup :] for i in batch)
    off = ({**ctx, "keep_freed_memory": "off"}, None)
    on = (off[0], TUNABLES) if args.env else ({**ctx, "keep_freed_memory": "on"}, None)
    rows = []
    for name in args.contenders.split(","):
        runs: dict[str, list[dict]] = {"off": [], "on": []}
        for rep in range(args.repeats):
            for variant, (run_ctx, env) in (("off", off), ("on", on)):
                r = run_child(str(HERE / "train_speed.py"), name, run_ctx, env=env)
                runs[variant].append({"tokens_per_s": tokens / r["seconds"], "peak_rss_mib": r["peak_rss_mib"]})
                print(
                    f"  [{rep + 1}/{args.repeats}] {name} {variant}: {tokens / r['seconds']:.0f} tokens/s", flush=True
                )
        tps = {v: [r["tokens_per_s"] for r in rs] for v, rs in runs.items()}
        rss = {v: statistics.median(r["peak_rss_mib"] for r in rs) for v, rs in runs.items()}
        pairs = [t / d for d, t in zip(tps["off"], tps["on"])]
        rows.append(
            {
                "contender": name,
                "tokens_per_s": {v: statistics.median(x) for v, x in tps.items()},
                "runs_tokens_per_s": tps,
                "pair_speedups": pairs,
                "peak_rss_mib": rss,
            }
        )
    print("\n| contender | off tokens/s | on tokens/s | pairs | peak RSS MiB (off, on) |")
    print("|---|---:|---:|---|---:|")
    for r in rows:
        pairs = ", ".join(f"{x:.2f}" for x in r["pair_speedups"])
        print(
            f"| {r['contender']} | {r['tokens_per_s']['off']:.0f} | {r['tokens_per_s']['on']:.0f} | {pairs} "
            f"| {r['peak_rss_mib']['off']:,.0f}, {r['peak_rss_mib']['on']:,.0f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    how = f"environment {TUNABLES}" if args.env else "keep_freed_memory: on (mallopt)"
    record = {"command": command_line(), "machine": machine, "on": how, "tokens": tokens, "rows": rows}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
