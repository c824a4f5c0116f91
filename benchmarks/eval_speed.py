"""Evaluation speed on the default model: examples/s for held-out loss, generation and multiple choice.

Each mode runs batched and one example at a time on the same data in the same process, so the
ratio shows what batching buys on this machine. The stop-string mode runs few-shot GSM8K in the plain
style (a base model runs on into another "Question:") twice: stopping each row at its stop string, and
generating to the limit then cutting (deltatune before round 2, issue 13); the texts must be equal.
The choice pair scores the same MMLU options with the LM head at the option positions only and at
every position (before round 2); the log-probabilities must agree.
Writes benchmarks/results/eval_speed.json.
Usage: python benchmarks/eval_speed.py [--model M] [--n 16] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import command_line, cpu_info  # noqa: E402


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> int:
    from deltatune.evaluate.choice import score_options
    from deltatune.evaluate.generate import GenerationConfig, cut_at_stop, generate
    from deltatune.evaluate.loss import loss_on_file
    from deltatune.evaluate.prompts import render
    from deltatune.evaluate.runner import EvalOptions, evaluate_task
    from deltatune.evaluate.tasks import load_items, load_shot_pool, resolve_task
    from deltatune.models import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=16, help="examples per mode")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()

    try:
        model, tok = load_model(args.model, dtype=args.dtype)
    except Exception as exc:  # the benchmark needs the real model; say why it is skipped
        print(f"eval_speed: skipped, cannot load the model: {exc}")
        return 0
    n, bs = args.n, args.batch_size
    gsm = load_items(resolve_task("gsm8k"), limit=n)
    rows = []

    # held-out loss: GSM8K test through the training data path (chatml, response-only)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gsm.jsonl"
        path.write_text("".join(json.dumps({"instruction": i.prompt, "output": i.shot_answer}) + "\n" for i in gsm))
        for b in (bs, 1):
            sec, res = timed(lambda: loss_on_file(model, tok, path, batch_size=b, progress=False))
            rows.append(
                {
                    "mode": "loss",
                    "batch": b,
                    "examples": n,
                    "seconds": sec,
                    "examples_per_s": n / sec,
                    "tokens": res.tokens,
                }
            )

    # greedy generation: GSM8K prompts in the chat template, fixed length budget
    prompts = [render(tok, "chat", [], i.prompt) for i in gsm]
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
    for b in (bs, 1):
        sec, _ = timed(lambda: generate(model, tok, prompts, cfg, batch_size=b, progress=False))
        rows.append({"mode": "generate", "batch": b, "examples": n, "seconds": sec, "examples_per_s": n / sec})

    # stop strings: plain few-shot prompts, stopped at "\nQuestion:" against generated to the limit and cut
    shots = [(s.prompt, s.shot_answer) for s in load_shot_pool(resolve_task("gsm8k"))[:3]]
    plain = [render(tok, "plain", shots, i.prompt) for i in gsm]
    stop = ("\nQuestion:",)
    long_cfg = GenerationConfig(max_new_tokens=4 * args.max_new_tokens)
    stopped_sec, stopped = timed(
        lambda: generate(
            model,
            tok,
            plain,
            GenerationConfig(max_new_tokens=4 * args.max_new_tokens, stop=stop),
            batch_size=bs,
            progress=False,
        )
    )
    full_sec, full = timed(lambda: generate(model, tok, plain, long_cfg, batch_size=bs, progress=False))
    same = stopped == [cut_at_stop(t, stop) for t in full]
    for mode, sec in (("generate-stop", stopped_sec), ("generate-cut", full_sec)):
        rows.append(
            {"mode": mode, "batch": bs, "examples": n, "seconds": sec, "examples_per_s": n / sec, "texts_equal": same}
        )

    # multiple choice: MMLU anatomy, 4 options scored by likelihood
    task = resolve_task("mmlu:anatomy")
    items = load_items(task, limit=n)
    for b in (bs * 2, 1):
        sec, res = timed(lambda: evaluate_task(model, tok, task, EvalOptions(batch_size=b, progress=False), items))
        rows.append(
            {"mode": "choice", "batch": b, "examples": n, "seconds": sec, "examples_per_s": n / sec, "acc": res.score}
        )

    # the LM head only at option positions (logits_to_keep) against at every position, same batches
    contexts = [render(tok, "chat", [], i.prompt) for i in items]
    options = [[" " + o for o in i.options] for i in items]
    scored = {}
    for mode, every in (("choice-scored-positions", False), ("choice-all-logits", True)):
        sec, scored[mode] = timed(
            lambda: score_options(model, tok, contexts, options, batch_size=bs * 2, progress=False, all_logits=every)
        )
        rows.append({"mode": mode, "batch": bs * 2, "examples": n, "seconds": sec, "examples_per_s": n / sec})
    gap = max(
        abs(a.logprob - b.logprob)
        for qa, qb in zip(scored["choice-scored-positions"], scored["choice-all-logits"])
        for a, b in zip(qa, qb)
    )
    rows[-2]["max_logprob_difference"] = rows[-1]["max_logprob_difference"] = gap

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    by = {(r["mode"], r["batch"]): r for r in rows}
    print(
        f"model {args.model or 'default'} ({args.dtype}), {n} examples per mode, torch threads "
        f"{torch.get_num_threads()}, load average {load}"
    )
    print(
        "| mode | batch | seconds | examples/s | against one-at-a-time (stop: against generate-cut; choice-*: against all logits) |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        one = by.get((r["mode"], 1)) or by[("generate-cut", bs)]
        if r["mode"].startswith("choice-"):
            one = by[("choice-all-logits", bs * 2)]
        ratio = r["examples_per_s"] / one["examples_per_s"]
        r["speedup_vs_batch1"] = ratio
        print(f"| {r['mode']} | {r['batch']} | {r['seconds']:.2f} | {r['examples_per_s']:.2f} | {ratio:.2f}x |")
    out = ROOT / "benchmarks" / "results" / "eval_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": args.model or "default",
                "dtype": args.dtype,
                "n": n,
                "max_new_tokens": args.max_new_tokens,
                "command": command_line(),
                "machine": cpu_info(),
                "threads": torch.get_num_threads(),
                "load_average_1min": load,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
