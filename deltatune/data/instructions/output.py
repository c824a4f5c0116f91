"""Atomic JSONL outputs that never replace a user's file by accident.

Each command checks its --out before any work (exists without --overwrite, or is one of the inputs),
writes through `deltatune.fileio.write_text_atomic` (a hidden temporary file beside it, renamed into place, with the user's umask), so a failure or a
kill at any moment leaves either no output or the previous one, never a half-written file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from deltatune.errors import UserError
from deltatune.fileio import check_writable, write_text_atomic


def check_output(
    out: str | Path, inputs: Iterable[str | Path] = (), overwrite: bool = False, field: str = "--out"
) -> Path:
    """Refuse an --out that is an input, that exists and `overwrite` is off, or that cannot be written (under a
    file, in a read-only folder): found now, not after all the work; returns it as a Path."""
    out = Path(out)
    for src in inputs:
        src = Path(src)
        if out.resolve() == src.resolve() or (out.exists() and src.exists() and os.path.samefile(out, src)):
            raise UserError("the output would replace an input file; choose another --out", file=str(out))
    if out.exists() and not overwrite:
        raise UserError("already exists; pass --overwrite to replace it", file=str(out))
    if out.exists() and out.is_dir():
        raise UserError("is a folder, expected a file name", file=str(out))
    check_writable(out, field=field)
    return out


def write_jsonl_atomic(out: str | Path, records: Iterable[dict]) -> int:
    """Write one JSON object per line (UTF-8, not ASCII-escaped) atomically; returns the count."""
    # default=str: a Parquet row's timestamp or decimal column is written as its text (it was a TypeError traceback)
    lines = [json.dumps(r, ensure_ascii=False, default=str) for r in records]
    write_text_atomic(out, "".join(line + "\n" for line in lines))
    return len(lines)


def write_json_atomic(out: str | Path, value: object) -> None:
    write_text_atomic(out, json.dumps(value, indent=2, ensure_ascii=False) + "\n")
