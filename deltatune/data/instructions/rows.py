"""Rows of a labelled or instruction file through the project's readers, with its column map and error style."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from deltatune.data.formats import (
    Conversation,
    Message,
    RawRecord,
    detect_format,
    invalid_unicode_field,
    mixed_format_error,
    parse_column_map,
    read_records,
    rename_columns,
    to_conversation,
)
from deltatune.data.segments import Role
from deltatune.errors import DataError


def record_error(rec: RawRecord, message: str, field: str | None = None) -> DataError:
    """A DataError naming the record's file and line (Parquet rows, which have no line, by index)."""
    if rec.line is None:
        field = f"[{rec.index}]" + (f".{field}" if field else "")
    return DataError(message, file=rec.file, line=rec.line, field=field)


def read_rows(path: str | Path, column_map: dict[str, str] | str | None = None) -> Iterator[RawRecord]:
    """Each record as a RawRecord whose `data` is a dict with columns renamed; the first bad record raises."""
    cmap = parse_column_map(column_map)
    for rec in read_records(path):
        if isinstance(rec, DataError):
            raise rec
        if not isinstance(rec.data, dict):
            raise record_error(rec, f"expected an object with named fields, got {type(rec.data).__name__}")
        if cmap:
            rec = RawRecord(rename_columns(rec.data, cmap), rec.file, rec.line, rec.index)
        yield rec


def read_instruction_records(
    path: str | Path, column_map: dict[str, str] | str | None = None
) -> tuple[list[tuple[RawRecord, Conversation]], str]:
    """Every record validated as `deltatune train` would read it (the first record fixes the format).

    Returns (record with columns renamed, its conversation) pairs and the file's format.
    """
    fmt = "auto"
    fixed_by: RawRecord | None = None  # the record whose fields fixed the format
    out = []
    for rec in read_rows(path, column_map):
        bad = invalid_unicode_field(rec.data)  # filter and mix copy whole records: fields nothing reads failed when
        if bad is not None:  # written (a UnicodeEncodeError traceback after all the work)
            raise record_error(rec, "not valid Unicode: a lone surrogate (half of an escaped UTF-16 pair)", bad or None)
        if fmt == "auto":
            fmt, fixed_by = detect_format(rec.data) or "auto", rec
        try:
            out.append((rec, to_conversation(rec, fmt)))
        except DataError as exc:  # a chat record in an Alpaca file: say so, not "field 'instruction': missing"
            raise (mixed_format_error(exc, rec, fixed_by, fmt, {}) if fmt != "auto" else exc) from None
    if not out:
        raise DataError("no records", file=str(path))
    return out, fmt


def prompt_text(conv: Conversation) -> str:
    """What the user side says: system and user messages, in order."""
    return "\n".join(m.content for m in conv.messages if m.role != "assistant")


def response_text(conv: Conversation) -> str:
    return "\n".join(m.content for m in conv.messages if m.role == "assistant")


def as_chat(conv: Conversation) -> dict:
    """A conversation as a `messages` record (Alpaca's instruction and input joined as training joins them); an
    assistant message marked `"weight": 0` (context, not a target) keeps its mark."""
    return {"messages": [_as_message(m) for m in conv.messages]}


def _as_message(message: Message) -> dict:
    out = {"role": message.role, "content": message.content}
    if message.role == "assistant" and message.parts and message.parts[-1][0] is Role.CONTEXT:
        out["weight"] = 0
    return out
