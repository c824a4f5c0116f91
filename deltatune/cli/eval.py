"""`deltatune eval`: score a model (optionally with an adapter) on built-in or user tasks.

Prints a table, writes JSON with --out (and per-item predictions with --predictions).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltatune.errors import UserError

if TYPE_CHECKING:  # imported lazily at run time: the CLI starts without torch
    from deltatune.evaluate.runner import EvalOptions


def add_eval_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `eval` and `forgetting`."""
    p.add_argument("--limit", type=int, default=None, help="at most N examples per file (per MMLU subject, BBH task)")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples in each prompt (seeded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16")
    p.add_argument(
        "--data-root",
        default=None,
        help="folder with gsm8k/ mmlu/ bbh/ self-instruct/ (default: $DELTATUNE_DATA, else ../shared/data)",
    )
    p.add_argument(
        "--prompt-style",
        default=None,
        choices=["chat", "alpaca", "plain"],
        help="default: chat when the tokenizer has a chat template, else plain",
    )
    p.add_argument(
        "--choice",
        default="option",
        choices=["option", "letter"],
        help="multiple choice by option-text likelihood (default) or by answer letter",
    )
    p.add_argument("--max-new-tokens", type=int, default=None, help="override the task's generation length")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument(
        "--map",
        default=None,
        help="the file's column names for file: and loss: tasks, COLUMN=FIELD as in train, e.g. "
        "question=instruction,answer=output (FIELD=COLUMN is read too)",
    )
    p.add_argument(
        "--template",
        default="auto",
        help="loss: tasks: the training template (auto | tokenizer | chatml | alpaca | raw)",
    )
    p.add_argument("--policy", default="response", help="loss: tasks: loss policy as in training (default response)")
    p.add_argument("--max-len", type=int, default=1024, help="loss: tasks: truncate examples to this many tokens")
    p.add_argument("--no-progress", action="store_true")
    code = p.add_argument_group("code tasks (code:PATH, HumanEval or MBPP format)")
    code.add_argument(
        "--allow-code-execution",
        action="store_true",
        help="run model-written programs (each in its own limited process; required for code: tasks)",
    )
    code.add_argument("--samples", type=int, default=1, help="completions per problem, n of pass@k (n > 1: --sample)")
    code.add_argument("--pass-k", default="1", help="comma list of k for pass@k (default 1)")
    code.add_argument("--exec-timeout", type=float, default=10.0, help="seconds per program (default 10)")
    code.add_argument("--exec-memory-mb", type=int, default=1024, help="address-space limit per program")
    code.add_argument("--exec-workers", type=int, default=None, help="programs at a time (default: core count)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a model on tasks (generation, multiple choice)", description=__doc__
    )
    p.add_argument("--model", default=None, help="model folder, GGUF file or hub id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None, help="adapter folder to load on top of the model")
    p.add_argument(
        "--task",
        required=True,
        help="comma list: gsm8k, mmlu[:subject], bbh[:task], self-instruct, file:PATH, loss:PATH, code:PATH",
    )
    p.add_argument("--out", default=None, help="write results JSON here")
    p.add_argument("--predictions", default=None, help="write per-item predictions (JSONL) here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out / --predictions file")
    p.add_argument(
        "--score",
        default=None,
        metavar="PREDICTIONS.jsonl",
        help="score completions made elsewhere (no model is loaded): lines of {task_id, completion} "
        "or {task_id, completions: [...]}, for one code: task",
    )
    add_eval_options(p)
    p.set_defaults(func=run)


# EvalOptions' field -> the flag that sets it
EVAL_OPTION_FLAGS = {"batch_size": "batch-size", "max_new_tokens": "max-new-tokens", "choice_mode": "choice"}


def options_from_args(args) -> EvalOptions:
    from deltatune.evaluate.generate import GenerationConfig
    from deltatune.evaluate.runner import EvalOptions

    # limit, batch size, max new tokens, shots, samples and the choice mode are EvalOptions' to check (below)
    # `not x > 0` rather than `x <= 0`: NaN passes every comparison, and inf or NaN were tracebacks from
    # transformers (temperature) or int() in the sandbox (timeout) after the model loaded
    if args.sample and not 0 < args.temperature < math.inf:
        raise UserError(
            f"sampling needs a temperature above 0, got {args.temperature} (leave out --sample for greedy)",
            field="temperature",
        )
    if not 0 <= args.temperature < math.inf:
        raise UserError(f"must be 0 or more, got {args.temperature}", field="temperature")
    if not 0 < args.top_p <= 1:
        raise UserError(f"must be in (0, 1], got {args.top_p}", field="top-p")
    gen = GenerationConfig(do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    try:
        pass_k = tuple(int(k) for k in str(args.pass_k).split(",") if k.strip())
    except ValueError:
        raise UserError(f"expected a comma list of integers, got '{args.pass_k}'", field="pass-k") from None
    for name in ("exec_workers", "exec_memory_mb"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError("must be at least 1", field=name.replace("_", "-"))
    if not pass_k or min(pass_k) < 1 or not 0 < args.exec_timeout < math.inf:
        raise UserError("k must be at least 1 and the timeout positive", field="pass-k/exec-timeout")
    if not args.sample and (args.temperature != 1.0 or args.top_p != 1.0):  # greedy decoding reads neither
        print("warning: --temperature and --top-p apply only with --sample; decoding is greedy", file=sys.stderr)
    try:
        return EvalOptions(
            limit=args.limit,
            shots=args.shots,
            seed=args.seed,
            batch_size=args.batch_size,
            style=args.prompt_style,
            choice_mode=args.choice,
            generation=gen,
            max_new_tokens=args.max_new_tokens,
            progress=not args.no_progress,
            template=args.template,
            policy=args.policy,
            max_len=args.max_len,
            samples=args.samples,
            pass_k=pass_k,
            allow_code_execution=args.allow_code_execution,
            exec_timeout=args.exec_timeout,
            exec_memory_mb=args.exec_memory_mb,
            exec_workers=args.exec_workers,
        )
    except UserError as exc:  # named as the flag that gave it
        raise exc.blamed_on(EVAL_OPTION_FLAGS.get(exc.field, exc.field)) from None


def resolve_tasks(spec: str, data_root: str | None, field_map: str | None):
    from deltatune.evaluate.tasks import parse_field_map, resolve_task

    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise UserError("no task given", field="task")
    fm = parse_field_map(field_map)
    tasks = [resolve_task(n, data_root, fm) for n in names]
    seen: set[str] = set()
    for task in tasks:  # results.json keys tasks by name: a second run of one replaced the first's entry
        if task.name in seen:
            raise UserError(f"task '{task.name}' is given twice", field="task")
        seen.add(task.name)
    return tasks


def evaluate_model(model_ref: str | None, adapter: str | None, tasks, opts, dtype: str = "fp32"):
    """Load a model (and adapter) and run every task; returns a list of TaskResult.

    Every task's data is read (and validated) before the model loads, so bad input fails fast.
    """
    from deltatune.evaluate.runner import check_choice_fits, check_code_options, check_task_options, evaluate_task
    from deltatune.evaluate.tasks import load_items
    from deltatune.models import load_model

    items = [load_items(task, opts.limit) for task in tasks]
    for task, its in zip(tasks, items):
        if task.kind == "code":
            check_code_options(opts, task, generating=True)
        check_task_options(task, its, opts)  # shots, loss policy and template: before hours of earlier tasks
    check_loss_data(model_ref, adapter, [t for t in tasks if t.kind == "loss"], opts)
    model, tokenizer = load_model(model_ref, dtype=dtype, adapter=adapter)
    for task, its in zip(tasks, items):  # options the model's context cannot hold: before any task runs
        check_choice_fits(model, tokenizer, task, its, opts)
    return [evaluate_task(model, tokenizer, task, opts, its) for task, its in zip(tasks, items)]


def check_loss_data(model_ref: str | None, adapter: str | None, tasks, opts) -> None:
    """Read every loss task's records as its run will (the model's tokenizer, the adapter's training template), so
    that a bad record is one line before the model loads, as for the other tasks (the run reads them again)."""
    if not tasks:
        return
    from deltatune.data.pipeline import prepare_dataset
    from deltatune.models import load_tokenizer, saved_chat_template

    if model_ref is None and adapter is not None:
        from deltatune.methods.peft_format import adapter_base_model

        model_ref = adapter_base_model(adapter)
    tokenizer = load_tokenizer(model_ref)
    if adapter is not None:
        tokenizer.chat_template = saved_chat_template(adapter) or tokenizer.chat_template
    for task in tasks:
        prepare_dataset(
            task.files[0],
            tokenizer,
            template=opts.template,
            column_map={column: name for name, column in task.field_map.items()} or None,
            max_len=opts.max_len,
            limit=opts.limit,
            keep_without_response=True,
        )


def recorded_options(args, tasks, results) -> dict[str, Any]:
    """Every setting that changes a score, resolved (the prompt style the tokenizer chose, the data root read),
    for results.json; per-task values (a task's own max_new_tokens, a loss task's template) are in its entry."""
    from deltatune.evaluate.tasks import data_root

    built_in = any(t.kind in ("generate", "choice") and t.format not in ("instruction",) for t in tasks)
    styles = sorted(
        {r.info["prompt_style"] for r in results if r.info.get("prompt_style") not in (None, "continuation")}
    )
    options: dict[str, Any] = {
        "limit": args.limit,
        "shots": args.shots,
        "seed": args.seed,
        "choice": args.choice,
        "prompt_style": ", ".join(styles) if styles else None,  # None: no task used a prompt style
        "prompt_style_flag": args.prompt_style,
        "max_new_tokens": args.max_new_tokens,  # None: each task's own (in its entry)
        "sample": args.sample,
        "dtype": None if args.score else args.dtype,
        "batch_size": None if args.score else args.batch_size,
        "data_root": str(data_root(args.data_root)) if built_in else args.data_root,
    }
    if args.sample:
        options.update(temperature=args.temperature, top_p=args.top_p)
    if any(t.kind == "loss" for t in tasks):
        options.update(template=args.template, policy=args.policy, max_len=args.max_len, map=args.map)
    if any(t.kind == "code" for t in tasks):
        options.update(exec_timeout=args.exec_timeout, exec_memory_mb=args.exec_memory_mb, samples=args.samples)
    return options


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A markdown table; floats with 4 decimals, None and NaN (nothing to average) as '-'."""

    def cell(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write via a temp file in the same folder and os.replace, so no half-written file is left."""
    from deltatune.fileio import write_text_atomic

    write_text_atomic(path, text)  # with the user's umask (mkstemp alone makes 0600 files)


def _half_precision(dtype: str) -> bool:
    import torch

    from deltatune.models import parse_dtype

    return parse_dtype(dtype) in (torch.bfloat16, torch.float16)


def check_result_files(args, tasks) -> None:
    """--out and --predictions, before anything runs (so results are never lost): a file name, not an
    existing file unless --overwrite, and never a file the evaluation reads (data, model, adapter)."""
    from deltatune.fileio import check_output, overlaps
    from deltatune.models import local_model_path

    reads: dict[str, Any] = {f"task data of {t.name}": f for t in tasks for f in (*t.files, *t.fewshot_files)}
    reads["--score file"] = args.score
    if not args.score:
        reads["model"] = local_model_path(args.model)
        reads["adapter"] = args.adapter
    if args.out and args.predictions and overlaps(args.out, args.predictions):
        raise UserError(f"{args.predictions} is also --out; give two files", field="predictions")
    for flag in ("out", "predictions"):
        path = getattr(args, flag, None)
        if not path:
            continue
        if Path(path).is_dir():
            raise UserError(f"{path} is a folder; give a file name", field=flag)
        check_output(path, overwrite=args.overwrite, reads=reads, field=flag, want_dir=False)


def run(args) -> int:
    opts = options_from_args(args)
    tasks = resolve_tasks(args.task, args.data_root, args.map)
    check_result_files(args, tasks)
    if args.score:
        from deltatune.evaluate.scoring import score_predictions

        results = score_predictions(args.score, tasks, opts)
    else:
        results = evaluate_model(args.model, args.adapter, tasks, opts, args.dtype)
    rows = [
        {
            "task": r.task,
            "n": r.n,
            "metric": r.metric,
            "score": r.score,
            **{k: v for k, v in r.metrics.items() if k != r.metric},
        }
        for r in results
    ]
    extra = sorted({k for row in rows for k in row} - {"task", "n", "metric", "score"})
    print(format_table(rows, ["task", "n", "metric", "score", *extra]))
    generated = [t.name for t in tasks if t.kind in ("generate", "code")]
    if generated and not args.score and _half_precision(args.dtype):
        print(
            f"note: {args.dtype} generation: greedy texts change with --batch-size (measured in docs/evaluation.md); "
            "compare these scores only with ones made at the same batch size, or use --dtype fp32",
            file=sys.stderr,
        )
    payload = {
        "model": args.model or "default",
        "adapter": args.adapter,
        "scored_file": args.score,
        "options": recorded_options(args, tasks, results),
        "tasks": {
            r.task: {"n": r.n, "metric": r.metric, "score": r.score, "metrics": r.metrics, **r.info} for r in results
        },
    }
    if args.out:
        write_atomic(args.out, json.dumps(payload, indent=2) + "\n")
    if args.predictions:
        lines = [json.dumps({"task": r.task, **p}) for r in results for p in r.predictions]
        write_atomic(args.predictions, "\n".join(lines) + "\n")
    return 0
