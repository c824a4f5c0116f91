"""Score completions made elsewhere (another engine, an earlier run) without loading a model.

A predictions file has one JSON object a line: `{"task_id": ..., "completion": "..."}` (one
sample; several lines with the same task_id add samples, as HumanEval's own `samples.jsonl`) or
`{"task_id": ..., "completions": ["...", ...]}` (n samples at once). `task_id` is the problem's id
in the task file (MBPP's integer ids as integers or text). Completions are used as they are:
for HumanEval they continue the prompt, for MBPP they are the whole program.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from deltatune.errors import DataError, UserError
from deltatune.evaluate.code import task_id_text
from deltatune.evaluate.runner import EvalOptions, TaskResult, check_code_options, score_code
from deltatune.evaluate.tasks import Task, load_items, read_utf8


def read_predictions(path: str | Path, known: dict[str, str]) -> dict[str, list[str]]:
    """task_id -> completions, in file order; `known` maps every task_id of the task file to its source."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: predictions file not found", field="score")
    out: dict[str, list[str]] = {}
    with io.StringIO(read_utf8(path), newline=None) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"not valid JSON ({exc.msg})", file=str(path), line=n) from exc
            if not isinstance(r, dict) or "task_id" not in r:
                raise DataError("expected a JSON object with a task_id", file=str(path), line=n)
            tid = task_id_text(r["task_id"], path, n)
            if tid not in known:
                raise DataError(f"task_id {tid!r} is not in the task file", file=str(path), line=n, field="task_id")
            if "completions" in r:
                texts = r["completions"]
                if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
                    raise DataError("expected a non-empty list of strings", file=str(path), line=n, field="completions")
            elif isinstance(r.get("completion"), str):
                texts = [r["completion"]]
            else:
                raise DataError(
                    "needs 'completion' (a string) or 'completions' (a list of strings)", file=str(path), line=n
                )
            out.setdefault(tid, []).extend(texts)
    return out


def score_predictions(path: str | Path, tasks: list[Task], opts: EvalOptions) -> list[TaskResult]:
    """pass@k of a predictions file on one code task; every problem (up to --limit) needs a completion."""
    if len(tasks) != 1 or tasks[0].kind != "code":
        raise UserError("--score takes exactly one code:PATH task", field="task")
    task = tasks[0]
    check_code_options(opts, task)
    every = load_items(task)
    chosen = every[: opts.limit] if opts.limit else every
    predictions = read_predictions(path, {it.problem.task_id: it.source for it in every})
    missing = [it for it in chosen if it.problem.task_id not in predictions]
    if missing:
        raise DataError(
            f"no completion for task_id {missing[0].problem.task_id!r} ({missing[0].source}) "
            f"and {len(missing) - 1} more",
            file=str(path),
        )
    problems = [it.problem for it in chosen]
    return [score_code(task.name, problems, [predictions[p.task_id] for p in problems], opts)]
