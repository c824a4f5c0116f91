"""Greedy generation against the batch size: how much faster, and does the answer change?

Batching prompts speeds decoding on a CPU, but a batch pads its rows and changes the shapes of every matrix
product, so the sums round differently; in bf16 one flipped argmax changes the rest of a greedy text. This
benchmark generates the same GSM8K test prompts (0-shot, chat template, as `deltatune eval --task gsm8k`) with
deltatune's generation at several batch sizes, in bf16 (bf16 weights under bf16 autocast, as learn-forget
measures adapter runs) and in fp32, and reports each batch size's time, its speed-up over one prompt at a time,
how many texts are identical to the one-at-a-time texts, and the strict exact match it scores.
Writes benchmarks/results/generation_batch.json.

Each repeat visits every batch size (rotated order, interleaved); times are medians, with the spread
(max - min) / median; texts must be identical between repeats (greedy decoding is deterministic).

Usage: python benchmarks/generation_batch.py [--n 40] [--max-new-tokens 160] [--batch-sizes 1,8,16,40]
                                              [--dtypes bf16,fp32] [--repeats 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import command_line, cpu_info, matmul_peak_gflops  # noqa: E402


def main() -> int:
    from deltatune.evaluate.runner import EvalOptions, evaluate_task
    from deltatune.evaluate.tasks import load_items, resolve_task
    from deltatune.models import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=40, help="GSM8K test problems (the first n)")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--batch-sizes", default="1,8,16,40", help="comma list; the first is the reference")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats; the table reports the median")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generation_batch.json"))
    args = ap.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    torch.manual_seed(0)

    task = resolve_task("gsm8k")
    items = load_items(task, limit=args.n)
    rows = []
    for dtype in args.dtypes.split(","):
        try:
            model, tok = load_model(args.model, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
        except Exception as exc:  # the benchmark needs the real model; say why it is skipped
            print(f"generation_batch: skipped, cannot load the model: {exc}")
            return 0
        model.eval()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
        seconds: dict[int, list[float]] = {b: [] for b in sizes}
        texts: dict[int, list[str]] = {}
        score: dict[int, float] = {}
        for rep in range(args.repeats):  # interleaved: each repeat visits every size, in a rotated order
            for b in sizes[rep % len(sizes) :] + sizes[: rep % len(sizes)]:
                opts = EvalOptions(batch_size=b, progress=False, max_new_tokens=args.max_new_tokens)
                start = time.perf_counter()
                with autocast:  # the scoring of `deltatune eval --task gsm8k` (0-shot, chat template)
                    res = evaluate_task(model, tok, task, opts, items)
                seconds[b].append(time.perf_counter() - start)
                out = [p["output"] for p in res.predictions]
                if texts.setdefault(b, out) != out:
                    raise RuntimeError(f"{dtype} batch {b}: greedy texts differ between repeats")
                score[b] = res.score
        ref = sizes[0]
        for b in sizes:
            median = statistics.median(seconds[b])
            new_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts[b])
            rows.append(
                {
                    "dtype": dtype,
                    "batch": b,
                    "seconds": round(median, 2),
                    "spread": round((max(seconds[b]) - min(seconds[b])) / median, 3),
                    "repeats": len(seconds[b]),
                    "new_tokens_per_s": round(new_tokens / median, 1),
                    "speedup_vs_first": round(statistics.median(seconds[ref]) / median, 2),
                    "texts_equal_to_first": sum(x == y for x, y in zip(texts[b], texts[ref])),
                    "exact_match_strict": round(score[b] * len(items)),
                    "n": len(items),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        del model

    print(f"\n{args.n} GSM8K test prompts, {args.max_new_tokens} new tokens at most, greedy")
    first = sizes[0]
    print(
        f"| dtype | batch | seconds (median of {args.repeats}) | spread | new tokens/s | speed-up vs batch {first} "
        f"| texts equal to batch {first} | strict EM |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dtype']} | {r['batch']} | {r['seconds']:.1f} | {r['spread']:.0%} | {r['new_tokens_per_s']:.1f} | "
            f"{r['speedup_vs_first']:.2f}x | {r['texts_equal_to_first']}/{r['n']} | {r['exact_match_strict']}/{r['n']} |"
        )
    doc = {
        "command": command_line(),
        "machine": {
            **cpu_info(),
            "bf16_matmul_peak_gflops": matmul_peak_gflops("bf16"),
            "threads": torch.get_num_threads(),
        },
        "model": args.model or "default",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
