"""`deltatune.train(config)` and `deltatune.evaluate(model, tokenizer, tasks)`: the command line's
`train` and `eval` as calls. The work is `deltatune.train.loop.train` and
`deltatune.evaluate.runner.evaluate_task`'s.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterable

from deltatune.errors import ConfigError

if TYPE_CHECKING:
    from deltatune.config import TrainConfig
    from deltatune.evaluate.runner import TaskResult
    from deltatune.evaluate.tasks import Task
    from deltatune.train.loop import TrainResult

__all__ = ["evaluate", "train"]


def as_config(
    config: "TrainConfig | dict[str, Any] | str | os.PathLike | None" = None, **overrides: Any
) -> "TrainConfig":
    """A validated TrainConfig from a TrainConfig, a dict of keys, or a YAML file; `overrides` win.
    Keys and values are checked as on the command line (one-line ConfigError naming the key)."""
    from deltatune.config import TrainConfig, load_config

    if isinstance(config, TrainConfig):
        return load_config(None, {**config.model_dump(), **overrides}) if overrides else config
    if config is None or isinstance(config, dict):
        return load_config(None, {**(config or {}), **overrides})
    if isinstance(config, (str, os.PathLike)):
        return load_config(config, overrides)
    raise ConfigError(f"config must be a TrainConfig, a dict or a YAML path, got {type(config).__name__}")


def train(
    config: "TrainConfig | dict[str, Any] | str | os.PathLike | None" = None,
    *,
    quiet: bool = False,
    records: list[dict] | None = None,
    eval_records: list[dict] | None = None,
    **overrides: Any,
) -> "TrainResult":
    """Run (or, with `resume: true`, resume) a finetune exactly as `deltatune train` does.

    `config`: a `deltatune.TrainConfig`, a dict of its keys (`{"data": "train.jsonl", "method":
    "lora", "rank": 8, "steps": 100, "output": "runs/x"}`), or a YAML file; keyword arguments
    override keys. `records` / `eval_records` pass data in memory instead of `data` / `eval_data`.
    Returns the TrainResult (output folder, steps, final and eval loss, tokens/s, per-step history).
    """
    from deltatune.train.loop import train as run_training

    return run_training(as_config(config, **overrides), quiet=quiet, records=records, eval_records=eval_records)


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: "str | Task | Iterable[str | Task]",
    *,
    limit: int | None = None,
    shots: int = 0,
    seed: int = 0,
    batch_size: int = 8,
    data_root: str | os.PathLike | None = None,
    field_map: dict[str, str] | str | None = None,
    progress: bool = False,
    **options: Any,
) -> "dict[str, TaskResult]":
    """Score `model` (a transformers model or a deltatune AdaptedModel) on `tasks`, as `deltatune eval`.

    `tasks`: "gsm8k", "mmlu[:subject]", "bbh[:task]", "self-instruct", "file:PATH", "loss:PATH",
    a comma list of them, or a list. `options` are the other fields of
    `deltatune.evaluate.runner.EvalOptions` (style, choice_mode, generation, max_new_tokens,
    template, policy, max_len). Every task's data is read before the first one runs, so bad input
    fails fast. Returns {task name: TaskResult} (`.score`, `.metrics`, `.predictions`).
    """
    from dataclasses import fields

    from deltatune.evaluate.runner import EvalOptions, evaluate_task
    from deltatune.evaluate.tasks import Task, load_items, load_shot_pool, resolve_task

    allowed = {f.name for f in fields(EvalOptions)} - {"limit", "shots", "seed", "batch_size", "progress"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown evaluation option '{unknown[0]}'; allowed: {', '.join(sorted(allowed))}", field=unknown[0]
        )
    from deltatune.api.model import _check_model
    from deltatune.methods.apply import AdaptedModel

    if isinstance(model, AdaptedModel):
        model = model.model
    _check_model(model, "evaluate")
    opts = EvalOptions(limit=limit, shots=shots, seed=seed, batch_size=batch_size, progress=progress, **options)
    field_map = _field_map(field_map)
    if isinstance(tasks, str):
        specs = [t.strip() for t in tasks.split(",") if t.strip()]
    elif isinstance(tasks, Task):
        specs = [tasks]
    elif isinstance(tasks, Iterable):
        specs = list(tasks)
    else:
        raise ConfigError(f"tasks must be a name, a Task or a list of them, got {type(tasks).__name__}", field="tasks")
    bad = [t for t in specs if not isinstance(t, (str, Task))]
    if bad:
        raise ConfigError(f"tasks must be names or Tasks, got {type(bad[0]).__name__}", field="tasks")
    if not specs:
        raise ConfigError("no task given", field="tasks")
    resolved = [t if isinstance(t, Task) else resolve_task(t, data_root, field_map) for t in specs]
    items = [load_items(t, limit) for t in resolved]
    if shots:
        for t in resolved:
            load_shot_pool(t)
    return {t.name: evaluate_task(model, tokenizer, t, opts, its) for t, its in zip(resolved, items)}


def _field_map(field_map: dict[str, str] | str | None) -> dict[str, str] | None:
    """{field: column} for the task readers, from `prepare`'s direction ({column: field}), the readers' own (every
    key a field: a file whose columns are named `prompt` and `completion` maps field to field), or --map's text."""
    from deltatune.evaluate.tasks import RECORD_FIELDS, parse_field_map

    if not field_map:
        return None
    if isinstance(field_map, str):
        return parse_field_map(field_map)
    if all(k in RECORD_FIELDS for k in field_map):
        return dict(field_map)
    if all(v in RECORD_FIELDS for v in field_map.values()):
        return {v: k for k, v in field_map.items()}
    raise ConfigError(
        f"field_map {field_map!r}: map the file's columns to fields ({', '.join(RECORD_FIELDS)}), as prepare's "
        "column_map does",
        field="field_map",
    )
