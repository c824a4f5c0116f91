"""Held-out losses on CPU: padded batches against each batch end to end in one unpadded row.

learn-forget scores every run's loss on the first 60 self-instruct references and the 40 GSM8K test solutions,
at batch 16. This scores the same sets on the default model both ways (`EvalOptions.flat_rows` False and True),
interleaved, in fp32 and in bf16 (bf16 weights under bf16 autocast, as learn-forget scores adapter runs), and
reports the median seconds, the speed-up, and how far the loss moved (nats).
Writes benchmarks/results/eval_rows.json.
Usage: python benchmarks/eval_rows.py [--repeats 3] [--threads 1] [--dtypes fp32,bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import command_line, machine_record  # noqa: E402


def main() -> int:
    from deltatune.evaluate.runner import EvalOptions, evaluate_task
    from deltatune.evaluate.tasks import load_items, resolve_task
    from deltatune.experiments import learn_forget as lf
    from deltatune.models import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: as each process of --jobs 2)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_rows.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = lf.SIZES["full"]

    work = SimpleNamespace(out=Path(tempfile.mkdtemp(prefix="eval_rows_")))
    gsm8k_items = load_items(resolve_task("gsm8k"), sizes["gsm8k"])
    tasks = {
        "self-instruct loss": (resolve_task(f"loss:{lf._selfinstruct_file(work, sizes['selfinstruct'])}"), None),
        "GSM8K test loss": (resolve_task(f"loss:{lf._gsm8k_test_file(work, gsm8k_items)}"), None),
    }
    opts = EvalOptions(batch_size=sizes["eval_batch"], progress=False, template="tokenizer", max_len=1024)

    rows = []
    for dtype in args.dtypes.split(","):
        model, tok = load_model(None, dtype=torch.bfloat16 if dtype == "bf16" else "fp32")
        model.eval()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
        for label, (task, items) in tasks.items():
            seconds, results = {"padded": [], "flat": []}, {}
            for rep in range(args.repeats):
                for way in ("padded", "flat") if rep % 2 == 0 else ("flat", "padded"):
                    t0 = time.perf_counter()
                    with autocast:
                        res = evaluate_task(model, tok, task, replace(opts, flat_rows=way == "flat"), items)
                    seconds[way].append(time.perf_counter() - t0)
                    results[way] = res
            p, f = results["padded"], results["flat"]
            row = {
                "dtype": dtype,
                "task": label,
                "padded_s": statistics.median(seconds["padded"]),
                "flat_s": statistics.median(seconds["flat"]),
                "padded_runs_s": seconds["padded"],
                "flat_runs_s": seconds["flat"],
                "padded_score": p.score,
                "flat_score": f.score,
            }
            row["speedup"] = row["padded_s"] / row["flat_s"]
            rows.append(row)
            print(
                f"{dtype:5s} {label:20s} padded {row['padded_s']:7.2f} s  flat {row['flat_s']:7.2f} s  "
                f"x{row['speedup']:.2f}  score {p.score:.5f} -> {f.score:.5f}",
                flush=True,
            )
        del model

    print("\n| dtype | measure | padded (s) | one row (s) | speed-up | padded score | one-row score | moved |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        moved = f"{abs(r['flat_score'] - r['padded_score']):.2e} nats"
        print(
            f"| {r['dtype']} | {r['task']} | {r['padded_s']:.1f} | {r['flat_s']:.1f} | {r['speedup']:.2f}x | "
            f"{r['padded_score']:.4f} | {r['flat_score']:.4f} | {moved} |"
        )
    out = {"command": command_line(), "machine": machine_record(), "repeats": args.repeats, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
