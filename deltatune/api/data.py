"""`deltatune.prepare`: records or a file -> a `datasets.Dataset` of tokenized, weighted examples.

Reading, templating, tokenizing and truncating are `deltatune.data.pipeline`'s; the rows are
`deltatune.data.collator.examples_to_dataset`'s. Nothing here but the argument handling.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from deltatune.data.collator import examples_to_dataset, single_policy
from deltatune.data.masking import LossPolicy
from deltatune.errors import DataError

__all__ = ["prepare"]


def prepare(
    data: str | os.PathLike | Iterable[dict[str, Any]],
    tokenizer: Any,
    *,
    template: str = "auto",
    policy: str | LossPolicy = "response",
    data_format: str = "auto",
    column_map: dict[str, str] | str | None = None,
    max_len: int = 1024,
    overflow: str = "truncate",
    skip_bad: bool = False,
    system_prompt: str | None = None,
    limit: int | None = None,
):
    """Tokenize `data` (a JSONL/JSON/Parquet/CSV path, a list of dicts, or a `datasets.Dataset` of
    records: Alpaca, chat `messages`, prompt/completion or text) with `template` ("auto": the
    tokenizer's chat template where it has one, else "chatml" where the vocabulary has ChatML's tokens, else
    "alpaca"; or "chatml", "alpaca", "tokenizer", "raw") and weight every token under the loss `policy` ("response",
    "instruction", "no-boilerplate", "all", "weighted:λ", with `,turns=last` / `,system=yes`).

    Returns a `datasets.Dataset` with columns `input_ids`, `labels` (-100 where the weight is 0),
    `loss_weights`, `roles`, `turns` and `source`; `dataset.info.description` holds the data
    report (records read, kept, truncated, dropped). A bad record raises `deltatune.DataError`
    naming file, line and field, unless `skip_bad`.
    """
    from deltatune.data.pipeline import prepare_dataset, prepare_records

    parsed = single_policy(policy)
    kwargs = dict(
        template=template,
        data_format=data_format,
        column_map=column_map,
        max_len=max_len,
        overflow=overflow,
        skip_bad=skip_bad,
        system_prompt=system_prompt,
        limit=limit,
        turns=parsed.turns,
    )
    if isinstance(data, (str, os.PathLike)):
        prepared = prepare_dataset(Path(data), tokenizer, **kwargs)
    else:
        prepared = prepare_records(_records(data), tokenizer, **kwargs)
    return examples_to_dataset(prepared.examples, parsed, description=prepared.report.summary())


def _records(data: Any) -> list[dict[str, Any]]:
    """`data` as a list of dicts, or a one-line DataError for what is not records (one record alone,
    a list of strings, a DataFrame)."""
    from collections.abc import Mapping

    if isinstance(data, Mapping):
        raise DataError("data is one record (a dict); pass a list of records, e.g. [record]", field="data")
    if not isinstance(data, Iterable):
        raise DataError(f"data must be a file path or records (dicts), got {type(data).__name__}", field="data")
    records = list(data)
    for i, r in enumerate(records):
        if not isinstance(r, Mapping):
            raise DataError(f"record {i} is a {type(r).__name__}, not a dict of fields", field="data")
    return [dict(r) for r in records]
