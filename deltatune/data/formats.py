"""Read record files (JSONL, JSON, Parquet, CSV) and validate records into conversations.

A record is turned into a `Conversation`: messages whose content is a list of role-tagged parts
(Alpaca's instruction and input stay separate parts of one user message, so every template can
still tell them apart). Every bad record raises a `DataError` naming file, line and field; the
caller decides whether to stop or to skip and count it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from deltatune.data.segments import Role
from deltatune.errors import DataError

FORMATS = ("auto", "alpaca", "chat", "prompt", "text")
CHAT_ROLES = ("system", "user", "assistant")
ALPACA_INPUT_SEPARATOR = "\n\n"  # between instruction and input when a chat template renders Alpaca data


@dataclass(frozen=True)
class Message:
    """One chat message; `parts` are (segment role, text) pieces of its content, in order."""

    role: str  # "system" | "user" | "assistant"
    parts: tuple[tuple[Role, str], ...]

    @property
    def content(self) -> str:
        return "".join(text for _, text in self.parts)


@dataclass
class Conversation:
    """A validated record: chat messages, or (kind == "text") one plain-text document."""

    messages: list[Message]
    source: str = ""
    kind: str = "chat"  # "chat" (rendered by a template) or "text" (no template)
    meta: dict = field(default_factory=dict)


@dataclass
class RawRecord:
    data: Any
    file: str
    line: int | None  # 1-based line (JSONL/JSON) or row line (CSV, header = line 1); None for Parquet rows
    index: int

    @property
    def source(self) -> str:
        return f"{self.file}:{self.line}" if self.line is not None else f"{self.file}#{self.index}"


# ---------------------------------------------------------------- files


def read_records(path: str | Path) -> Iterator[RawRecord | DataError]:
    """Yield raw records of a file in order; an unreadable record is yielded as its DataError.

    Yielding errors (instead of raising) lets `--skip-bad` skip one line and go on; errors that
    make the whole file unreadable are raised.
    """
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise DataError("no such file", file=name)
    if p.is_dir():
        raise DataError("a folder, not a data file", file=name)
    suffix = "".join(p.suffixes[-1:]).lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _read_jsonl(p, name)
    elif suffix == ".json":
        yield from _read_json(p, name)
    elif suffix == ".parquet":
        yield from _read_parquet(p, name)
    elif suffix in (".csv", ".tsv"):
        yield from _read_csv(p, name, delimiter="\t" if suffix == ".tsv" else ",")
    else:
        raise DataError(f"unknown file type '{suffix or p.name}' (expected .jsonl, .json, .parquet or .csv)", file=name)


def _utf8_error(raw: bytes, exc: UnicodeDecodeError, name: str, line: int) -> DataError:
    return DataError(f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})", file=name, line=line)


def _read_jsonl(p: Path, name: str) -> Iterator[RawRecord | DataError]:
    with p.open("rb") as fh:
        index = 0
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM (Windows tools) is no error
            except UnicodeDecodeError as exc:
                yield _utf8_error(raw, exc, name, lineno)
                index += 1
                continue
            if not text.strip():  # a first line holding only a BOM
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                yield DataError(f"not valid JSON ({exc.msg} at column {exc.colno})", file=name, line=lineno)
                index += 1
                continue
            except RecursionError:
                yield DataError("JSON nested too deeply to read", file=name, line=lineno)
                index += 1
                continue
            yield RawRecord(data, name, lineno, index)
            index += 1


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _read_json(p: Path, name: str) -> Iterator[RawRecord | DataError]:
    """A JSON array of records (or an object holding one such array), with each record's line."""
    raw = p.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):  # a BOM (Windows tools) is no error
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1)
        raise DataError(f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {col + 1})", file=name, line=line)
    try:
        top = json.loads(text)
    except json.JSONDecodeError as exc:
        first = text[: exc.pos].strip()  # one object on its first line: JSON Lines (not pretty-printed objects)
        if exc.msg == "Extra data" and "\n" not in first and _is_json_object(first):  # JSON Lines named .json, as
            yield from _read_jsonl(p, name)  # `datasets`' to_json writes them: read as `datasets` reads them
            return
        raise DataError(f"not valid JSON ({exc.msg} at column {exc.colno})", file=name, line=exc.lineno)
    except RecursionError:
        raise DataError("JSON nested too deeply to read", file=name) from None
    if isinstance(top, dict) and _is_one_chat_record(top):  # {"messages": [...]}: a record, not a list of them
        yield RawRecord(top, name, 1, 0)
        return
    if isinstance(top, dict):
        lists = [k for k, v in top.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(
                "expected a JSON array of records, or an object with exactly one array of records", file=name
            )
        records = top[lists[0]]
        yield from _with_lines(records, text, _value_start(text, lists[0]), name)
        return
    if not isinstance(top, list):
        raise DataError(f"expected a JSON array of records, got {type(top).__name__}", file=name)
    yield from _with_lines(top, text, text.index("["), name)


_BLANK = " \t\r\n"


def _value_start(text: str, key: str) -> int:
    """Where the value of the top-level object's `key` starts in `text` (already parsed, so well formed)."""
    decoder = json.JSONDecoder()
    pos = text.index("{") + 1
    while True:
        while text[pos] in _BLANK + ",":
            pos += 1
        name, pos = decoder.raw_decode(text, pos)
        while text[pos] in _BLANK + ":":
            pos += 1
        if name == key:  # a repeated key: json.loads keeps the last, and so does this
            last = pos
        _, pos = decoder.raw_decode(text, pos)
        while pos < len(text) and text[pos] in _BLANK:
            pos += 1
        if text[pos] == "}":
            return last


def _with_lines(items: list, text: str, array_start: int, name: str) -> Iterator[RawRecord]:
    """Each element of the array that opens at `array_start`, with the line where it starts: the array is walked
    once more with raw_decode."""
    decoder = json.JSONDecoder()
    pos = array_start + 1
    line = text.count("\n", 0, pos) + 1
    for i in range(len(items)):
        while text[pos] in _BLANK + ",":
            if text[pos] == "\n":
                line += 1
            pos += 1
        _, end = decoder.raw_decode(text, pos)
        yield RawRecord(items[i], name, line, i)
        line += text.count("\n", pos, end)
        pos = end


def _is_one_chat_record(top: dict) -> bool:
    """A .json file holding a single chat record: its one array is `messages`, of objects with a `role`."""
    messages = top.get("messages")
    return isinstance(messages, list) and bool(messages) and all(isinstance(m, dict) and "role" in m for m in messages)


def _read_parquet(p: Path, name: str) -> Iterator[RawRecord | DataError]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"cannot read Parquet file ({exc})", file=name)
    for i, row in enumerate(table.to_pylist()):
        try:
            yield RawRecord(_decode_bytes(row), name, None, i)
        except UnicodeDecodeError as exc:
            bad = next(k for k, v in row.items() if isinstance(v, bytes) and _bad_utf8(v))
            yield DataError(f"not valid UTF-8 (byte 0x{exc.object[exc.start]:02x})", file=name, field=f"[{i}].{bad}")


def _decode_bytes(row: dict) -> dict:
    """Binary cells (Parquet/CSV read as bytes) become str; invalid UTF-8 raises UnicodeDecodeError."""
    return {k: (v.decode("utf-8") if isinstance(v, bytes) else v) for k, v in row.items()}


def _read_csv(p: Path, name: str, delimiter: str) -> Iterator[RawRecord | DataError]:
    """CSV with a header row; every cell is read as bytes so that numbers stay text and UTF-8 is checked per row."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    parse = pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
    try:
        with pacsv.open_csv(p, parse_options=parse, convert_options=pacsv.ConvertOptions(check_utf8=False)) as reader:
            names = reader.schema.names
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:  # a row becomes a dict: all but the last such cell would be dropped silently
            raise DataError("the header names this column twice; rename one of them", file=name, line=1, field=twice)
        convert = pacsv.ConvertOptions(
            column_types={n: pa.binary() for n in names},
            check_utf8=False,
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        )
        table = pacsv.read_csv(p, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as exc:
        raise DataError(f"cannot read CSV ({str(exc).splitlines()[0]})", file=name, line=_bad_row_line(p, delimiter))
    lines = _csv_row_lines(p, delimiter, table.num_rows)
    for i, row in enumerate(table.to_pylist()):
        line = lines[i] if lines else i + 2  # line 1 is the header
        try:
            yield RawRecord(_decode_bytes(row), name, line, i)
        except UnicodeDecodeError as exc:
            bad = next(k for k, v in row.items() if isinstance(v, bytes) and _bad_utf8(v))
            yield DataError(f"not valid UTF-8 (byte 0x{exc.object[exc.start]:02x})", file=name, line=line, field=bad)


def _csv_row_lines(p: Path, delimiter: str, n_rows: int) -> list[int] | None:
    """The line on which each data row starts, or None when every row is one line (row i on line i + 2).

    A quoted cell may span lines, and empty lines are skipped: then rows and lines part ways, and
    Python's csv module (quotes only at the start of a cell, as pyarrow reads them) finds the lines.
    """
    raw = p.read_bytes()
    n_lines = raw.count(b"\n") + (0 if raw.endswith(b"\n") else 1)
    if n_lines == n_rows + 1 and b'"' not in raw:
        return None
    import csv
    import io

    # latin-1 maps every byte to one character, so quotes and newlines are found whatever the encoding
    reader = csv.reader(io.StringIO(raw.decode("latin-1"), newline=""), delimiter=delimiter)
    starts, prev = [], 0
    limit = csv.field_size_limit(max(len(raw), 131072))  # a long cell is no error here
    try:
        for row in reader:
            if row:  # an empty line is no row
                starts.append(prev + 1)
            prev = reader.line_num
    except csv.Error:
        return None
    finally:
        csv.field_size_limit(limit)
    starts = starts[1:]  # the header
    return starts if len(starts) == n_rows else None


def _bad_row_line(p: Path, delimiter: str) -> int | None:
    """The line where the first row with another number of cells than the header starts (pyarrow's parse error
    names no line), or None when Python's csv module finds none."""
    import csv
    import io

    reader = csv.reader(io.StringIO(p.read_bytes().decode("latin-1"), newline=""), delimiter=delimiter)
    limit = csv.field_size_limit(max(p.stat().st_size, 131072))
    try:
        width, start = None, 1
        for row in reader:
            if row:
                if width is None:
                    width = len(row)
                elif len(row) != width:
                    return start
            start = reader.line_num + 1
    except csv.Error:
        return start
    finally:
        csv.field_size_limit(limit)
    return None


def _bad_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


# ---------------------------------------------------------------- records -> conversations


def parse_column_map(spec: str | dict | None) -> dict[str, str]:
    """`"question=instruction,answer=output"` -> {"question": "instruction", "answer": "output"}."""
    if spec is None or isinstance(spec, dict):
        return dict(spec or {})
    out: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        src, sep, dst = item.partition("=")
        if not sep or not src.strip() or not dst.strip():
            raise DataError(f"column mapping '{item}' is not of the form source=target", field="--map")
        if dst.strip() in out.values():
            raise DataError(f"column mapping names '{dst.strip()}' as the target of two columns", field="--map")
        if src.strip() in out:  # the last mapping won, silently
            raise DataError(f"column mapping maps the column '{src.strip()}' twice", field="--map")
        out[src.strip()] = dst.strip()
    return out


def rename_columns(data: dict, column_map: dict[str, str]) -> dict:
    """A record's fields renamed by `--map`: a renamed column replaces a field the record already has under the
    new name (`question=instruction` trains on the question even where the record also holds an `instruction`;
    which one won depended on the order of the record's keys)."""
    renamed = {k: v for k, v in data.items() if k not in column_map}
    for source, target in column_map.items():
        if source in data:
            renamed[target] = data[source]
    return renamed


def detect_format(data: dict) -> str | None:
    """The format a (column-mapped) record looks like, or None."""
    if "messages" in data:
        return "chat"
    if "instruction" in data or ("output" in data and "prompt" not in data):
        return "alpaca"
    if "prompt" in data or "completion" in data:
        return "prompt"
    if "text" in data:
        return "text"
    return None


FORMAT_FIELDS = {"chat": "messages", "alpaca": "instruction/output", "prompt": "prompt/completion", "text": "text"}


def mixed_format_error(exc: DataError, rec: RawRecord, fixed_by: RawRecord, fmt: str, column_map: dict) -> DataError:
    """`exc` restated when `rec` failed only because it is in another format than the record that fixed the
    file's format (a missing 'instruction' says nothing about why a chat record was read as Alpaca)."""
    if not isinstance(rec.data, dict):
        return exc
    other = detect_format(rename_columns(rec.data, column_map))
    if other is None or other == fmt:
        return exc
    where = f"line {fixed_by.line}" if fixed_by.line is not None else f"record [{fixed_by.index}]"
    return _Errors(rec)(
        f"{'an' if other[0] in 'aeiou' else 'a'} {other} record ({FORMAT_FIELDS[other]}) in a file whose first record ({where}) is {fmt} "
        f"({FORMAT_FIELDS[fmt]}): one format per file; split the file or convert these records",
        FORMAT_FIELDS[other].split("/")[0],
    )


def to_conversation(
    rec: RawRecord, data_format: str, column_map: dict[str, str] | None = None, system_prompt: str | None = None
) -> Conversation:
    """Validate one raw record and build its conversation; raises DataError naming the field."""
    data = rec.data
    err = _Errors(rec)
    if not isinstance(data, dict):
        raise err(f"expected an object with named fields, got {type(data).__name__}")
    if column_map:
        data = rename_columns(data, column_map)
    fmt = data_format
    if fmt == "auto":
        fmt = detect_format(data)
        if fmt is None:
            raise err(
                f"cannot tell the format from fields {sorted(data)}; expected messages, instruction/output, "
                "prompt/completion or text (use --map to rename fields)"
            )
    if fmt == "alpaca":
        instruction = err.text(data, "instruction")
        inp = err.text(data, "input", required=False)
        output = err.text(data, "output")
        parts: list[tuple[Role, str]] = [(Role.INSTRUCTION, instruction)]
        if inp.strip():  # an input of spaces is no input (it made the template's "paired with an input" preamble)
            parts += [(Role.TEMPLATE, ALPACA_INPUT_SEPARATOR), (Role.INPUT, inp)]
        msgs = [Message("user", tuple(parts)), Message("assistant", ((Role.RESPONSE, output),))]
        system = err.text(data, "system", required=False) or system_prompt
        if system:
            msgs.insert(0, Message("system", ((Role.SYSTEM, system),)))
        return Conversation(msgs, rec.source)
    if fmt == "prompt":
        prompt = err.text(data, "prompt")
        completion = err.text(data, "completion")
        msgs = [Message("user", ((Role.INSTRUCTION, prompt),)), Message("assistant", ((Role.RESPONSE, completion),))]
        if system_prompt:
            msgs.insert(0, Message("system", ((Role.SYSTEM, system_prompt),)))
        return Conversation(msgs, rec.source)
    if fmt == "text":
        return Conversation([Message("assistant", ((Role.RESPONSE, err.text(data, "text")),))], rec.source, kind="text")
    if fmt == "chat":
        return Conversation(_chat_messages(data, err, system_prompt), rec.source)
    raise DataError(f"unknown data format '{data_format}' (choose from {', '.join(FORMATS)})", field="--data-format")


_ROLE_PART = {"system": Role.SYSTEM, "user": Role.INSTRUCTION, "assistant": Role.RESPONSE}


def _chat_messages(data: dict, err: "_Errors", system_prompt: str | None) -> list[Message]:
    raw = data.get("messages")
    if raw is None:
        raise err("missing", "messages")
    if not isinstance(raw, list):
        raise err(f"expected a list of messages, got {type(raw).__name__}", "messages")
    if not raw:
        raise err("empty (no messages)", "messages")
    msgs: list[Message] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise err(f"expected an object with role and content, got {type(m).__name__}", where)
        role = m.get("role")
        if role is None:
            raise err("missing", f"{where}.role")
        if not isinstance(role, str):
            raise err(f"expected a string, got {type(role).__name__}", f"{where}.role")
        if role not in CHAT_ROLES:
            raise err(f"unknown role '{role}' (expected one of {', '.join(CHAT_ROLES)})", f"{where}.role")
        content = err.text(m, "content", field_name=f"{where}.content")
        if role == "system" and i != 0:
            raise err("a system message may only come first", f"{where}.role")
        part = _ROLE_PART[role]
        if "weight" in m:  # OpenAI's fine-tuning format: 0 keeps an assistant message as context only
            weight = m["weight"]
            if role != "assistant":
                raise err("only an assistant message takes a weight", f"{where}.weight")
            if isinstance(weight, bool) or weight not in (0, 1):
                raise err(f"expected 0 or 1, got {weight!r}", f"{where}.weight")
            if weight == 0:
                part = Role.CONTEXT
        msgs.append(Message(role, ((part, content),)))
    if system_prompt and msgs[0].role != "system":
        msgs.insert(0, Message("system", ((Role.SYSTEM, system_prompt),)))
    if not any(m.role == "assistant" for m in msgs):
        raise err("no assistant message: nothing to learn from", "messages")
    return msgs


class _Errors:
    """Builds DataErrors that name the record's file and line."""

    def __init__(self, rec: RawRecord) -> None:
        self.rec = rec

    def __call__(self, message: str, field: str | None = None) -> DataError:
        if self.rec.line is None:
            field = f"[{self.rec.index}]" + (f".{field}" if field else "")
        return DataError(message, file=self.rec.file, line=self.rec.line, field=field)

    def text(self, data: dict, key: str, *, required: bool = True, field_name: str | None = None) -> str:
        name = field_name or key
        value = data.get(key)
        if value is None:
            if required:
                raise self("missing", name)
            return ""
        if not isinstance(value, str):
            raise self(f"expected a string, got {type(value).__name__}", name)
        if required and not value.strip():
            raise self("empty", name)
        bad = lone_surrogate(value)
        if bad is not None:
            raise self(bad, name)
        return value


def lone_surrogate(text: str) -> str | None:
    """Why `text` is no valid Unicode (half of a UTF-16 pair, as JSON's "\\ud83d" escape gives), or None.

    Such a str reaches Python from JSON but cannot be encoded: the Rust tokenizer rejects the whole
    batch (a TypeError naming no record) and writing it as UTF-8 fails, so it is refused per field.
    """
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"not valid Unicode: a lone surrogate \\u{ord(text[exc.start]):04x} at character {exc.start + 1} "
            "(half of an escaped UTF-16 pair)"
        )
    return None


def invalid_unicode_field(value: Any, where: str = "") -> str | None:
    """The dotted path of the first string in a JSON value (keys included) that is no valid Unicode, "" for the
    value itself, or None. Fields nothing validates (a record's `meta`, `id`) were copied through and failed
    when written, a UnicodeEncodeError traceback after all the work."""
    if isinstance(value, str):
        return where if lone_surrogate(value) is not None else None
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and lone_surrogate(key) is not None:
                return where  # the object holding the key: the key itself cannot be written in an answer or error
            found = invalid_unicode_field(item, f"{where}.{key}" if where else str(key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = invalid_unicode_field(item, f"{where}.{i}" if where else str(i))
            if found is not None:
                return found
    return None
