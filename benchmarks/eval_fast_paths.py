"""Two evaluation fast paths, each against the way it was done before, on learn-forget's own measures.

- Multiple choice (MMLU, the experiment's 4 subjects, 80 questions, option likelihood): each (context, option)
  pair as a whole row, against each context once with its options over its key/value cache
  (`score_options(shared_context=...)`). Reports seconds, accuracy, how far the log-likelihoods moved and
  whether any prediction changed.
- Generation (GSM8K 0-shot, 40 prompts, 160 new tokens in one batch; BIG-Bench Hard, 36 items, 48 tokens):
  transformers' own `logits_to_keep=1` (a slice of the last position: torch's matmul then expands the LM head's
  weight once per prompt in the prefill), against the last position chosen by index (what `generate` passes
  now). Reports seconds and whether the texts are equal.
Each pair runs interleaved (the order alternating), on the default model with bf16 weights under bf16 autocast,
as learn-forget scores its adapter runs, at one thread (as each process of `--jobs 2`); medians are reported.
Writes benchmarks/results/eval_fast_paths.json.
Usage: python benchmarks/eval_fast_paths.py [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import command_line, machine_record  # noqa: E402


def main() -> int:
    from deltatune.evaluate import choice, runner
    from deltatune.evaluate.runner import EvalOptions, evaluate_task
    from deltatune.evaluate.tasks import load_items, resolve_task
    from deltatune.experiments import learn_forget as lf
    from deltatune.models import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: as each process of --jobs 2)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_fast_paths.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = lf.SIZES["full"]
    model, tok = load_model(None, dtype=torch.bfloat16)
    model.eval()
    opts = EvalOptions(batch_size=sizes["eval_batch"], progress=False, template="tokenizer", max_len=1024)

    mmlu = resolve_task(f"mmlu:{lf.MMLU_SUBJECTS}")
    gsm8k, bbh = resolve_task("gsm8k"), resolve_task(f"bbh:{lf.BBH_TASKS}")
    items = {
        mmlu.name: load_items(mmlu, sizes["mmlu"]),
        gsm8k.name: load_items(gsm8k, sizes["gsm8k"]),
        bbh.name: load_items(bbh, sizes["bbh"]),
    }
    scored: dict[bool, list] = {}
    real_score_options = choice.score_options

    def choice_way(shared: bool):
        def score(*a, **k):
            scored[shared] = real_score_options(*a, shared_context=shared, **k)
            return scored[shared]

        runner.score_options = score  # the benchmark picks the path; the library picks it by the model
        return evaluate_task(model, tok, mmlu, opts, items[mmlu.name])

    real_generate = model.generate

    def generation_way(task, tokens: int, by_index: bool):
        if not by_index:  # transformers' own default, as deltatune's generate passed it before
            model.generate = lambda *a, **k: real_generate(*a, **{**k, "logits_to_keep": 1})
        try:
            o = replace(opts, max_new_tokens=tokens, batch_size=sizes["generate_batch"])
            return evaluate_task(model, tok, task, o, items[task.name])
        finally:
            model.generate = real_generate

    cases = {
        "MMLU option likelihood": (
            ("whole rows", lambda: choice_way(False)),
            ("shared context", lambda: choice_way(True)),
        ),
        "GSM8K generation": (
            ("head by slice", lambda: generation_way(gsm8k, sizes["max_new_tokens"], False)),
            ("head by index", lambda: generation_way(gsm8k, sizes["max_new_tokens"], True)),
        ),
        "BBH generation": (
            ("head by slice", lambda: generation_way(bbh, sizes["bbh_tokens"], False)),
            ("head by index", lambda: generation_way(bbh, sizes["bbh_tokens"], True)),
        ),
    }
    rows = []
    for label, ways in cases.items():
        seconds: dict[str, list[float]] = {name: [] for name, _ in ways}
        results = {}
        for rep in range(args.repeats):
            for name, run in ways if rep % 2 == 0 else ways[::-1]:
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    results[name] = run()
                seconds[name].append(time.perf_counter() - t0)
        (old, _), (new, _) = ways
        row = {
            "measure": label,
            "old": old,
            "new": new,
            "old_s": statistics.median(seconds[old]),
            "new_s": statistics.median(seconds[new]),
            "old_runs_s": seconds[old],
            "new_runs_s": seconds[new],
            "old_score": results[old].score,
            "new_score": results[new].score,
        }
        row["speedup"] = row["old_s"] / row["new_s"]
        if label.startswith("MMLU"):
            moved = [abs(a.logprob - b.logprob) for qa, qb in zip(scored[False], scored[True]) for a, b in zip(qa, qb)]
            row["logprob_moved_max"], row["logprob_moved_mean"] = max(moved), statistics.fmean(moved)
            row["predictions_changed"] = sum(
                choice.predict(a) != choice.predict(b) for a, b in zip(scored[False], scored[True])
            )
        else:
            row["texts_equal"] = [r["output"] for r in results[old].predictions] == [
                r["output"] for r in results[new].predictions
            ]
        rows.append(row)
        print(
            f"{label:24s} {old} {row['old_s']:6.1f} s  {new} {row['new_s']:6.1f} s  x{row['speedup']:.2f}  "
            f"score {row['old_score']:.4f} -> {row['new_score']:.4f}",
            flush=True,
        )

    print("\n| measure | before | now | seconds before | seconds now | speed-up | score before -> now | outputs |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "texts_equal" in r:
            same = "texts equal" if r["texts_equal"] else "texts differ"
        else:
            same = (
                f"log-likelihoods moved {r['logprob_moved_mean']:.3f} mean, {r['logprob_moved_max']:.3f} max (nats); "
                f"{r['predictions_changed']} predictions changed"
            )
        print(
            f"| {r['measure']} | {r['old']} | {r['new']} | {r['old_s']:.1f} | {r['new_s']:.1f} | {r['speedup']:.2f}x | "
            f"{r['old_score']:.4f} -> {r['new_score']:.4f} | {same} |"
        )
    out = {"command": command_line(), "machine": machine_record(), "repeats": args.repeats, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
