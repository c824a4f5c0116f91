"""Labelled data to instruction data, the FLAN / P3 recipe: one task phrased several ways.

A task file (YAML) holds phrasings whose `{placeholders}` name the data file's columns, and the word
for each label; `{options}` lists the label words. A phrasing is a string (all of it becomes the
instruction) or a mapping with an `instruction:` and an `input:` part. Every example gets one phrasing
(round-robin, or drawn with a seed) or K distinct ones; its output is the word of its label.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from deltatune.data.formats import RawRecord, invalid_unicode_field, lone_surrogate
from deltatune.data.instructions.rows import read_rows, record_error
from deltatune.errors import ConfigError, DataError

OPTIONS = "options"  # the placeholder that lists the label words
OPTIONS_SEPARATOR = ", "


@dataclass(frozen=True)
class Phrasing:
    instruction: str
    input: str | None = None  # None: the phrasing has no input part

    @property
    def placeholders(self) -> set[str]:
        return _placeholders(self.instruction) | (_placeholders(self.input) if self.input is not None else set())

    def short(self, width: int = 60) -> str:
        text = " | ".join(p for p in (self.instruction, self.input) if p is not None).replace("\n", "\\n")
        return text if len(text) <= width else text[: width - 3] + "..."


@dataclass
class LabelTask:
    name: str
    phrasings: list[Phrasing]
    labels: dict[str, str]  # label value (as text) -> label word, in the task file's order
    file: str = "<task>"

    @property
    def options(self) -> str:
        return OPTIONS_SEPARATOR.join(self.labels.values())


@dataclass
class FromLabelsReport:
    examples: int = 0
    records: int = 0
    per_phrasing: list[int] = field(default_factory=list)  # records per phrasing, by index
    per_label: dict[str, int] = field(default_factory=dict)  # records per label value, in the task's order

    def format(self, task: LabelTask) -> str:
        lines = [f"{self.examples} examples -> {self.records} records (task '{task.name}')", "per phrasing:"]
        lines += [f"  [{i}] {n:>7}  {p.short()}" for i, (n, p) in enumerate(zip(self.per_phrasing, task.phrasings))]
        lines.append("per label:")
        lines += [f"  {value} ({task.labels[value]}): {n}" for value, n in self.per_label.items()]
        return "\n".join(lines) + "\n"


def _placeholders(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


def _check_template(text: object, file: str, where: str) -> str:
    if not isinstance(text, str):
        raise ConfigError(f"expected text, got {type(text).__name__}", file=file, field=where)
    if not text.strip():
        raise ConfigError("empty", file=file, field=where)
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(text)]
    except ValueError as exc:  # unbalanced braces
        raise ConfigError(
            f"not a valid template ({exc}); write a literal brace as {{{{ or }}}}", file=file, field=where
        ) from None
    for name, spec, conversion in fields:
        if name is None:
            continue
        if not name.isidentifier():
            raise ConfigError(f"placeholder {{{name}}} must be a column name", file=file, field=where)
        if spec or conversion:  # {text:d} or {text!x} failed with a traceback on the first row; {text!r} quoted
            written = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ConfigError(
                f"placeholder {{{written}}} takes no conversion or format; write {{{name}}}", file=file, field=where
            )
    return text


def load_task(path: str | Path) -> LabelTask:
    """Read and check a task file; every mistake names the file and the field."""
    name = str(path)
    p = Path(path)
    if not p.exists():
        raise ConfigError("no such file", file=name)
    if p.is_dir():
        raise ConfigError("is a folder, expected a task file (YAML)", file=name)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        before = exc.object[: exc.start]
        column = exc.start - before.rfind(b"\n")
        raise ConfigError(
            f"not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at column {column})",
            file=name,
            line=before.count(b"\n") + 1,
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read it ({exc.strerror or exc})", file=name) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(
            f"not valid YAML ({getattr(exc, 'problem', exc)})", file=name, line=mark.line + 1 if mark else None
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError("expected a mapping with templates and labels", file=name)
    bad = invalid_unicode_field(raw)  # YAML's "\ud800" escape: every output record failed when written
    if bad is not None:
        raise ConfigError("not valid Unicode: a lone surrogate (half of an escaped UTF-16 pair)", file=name, field=bad)
    unknown = sorted(set(raw) - {"name", "templates", "labels"})
    if unknown:
        raise ConfigError("unknown key (expected name, templates, labels)", file=name, field=unknown[0])
    templates = raw.get("templates")
    if not isinstance(templates, list) or not templates:
        raise ConfigError("expected a non-empty list of phrasings", file=name, field="templates")
    phrasings = []
    for i, t in enumerate(templates):
        where = f"templates[{i}]"
        if isinstance(t, dict):
            extra = sorted(set(t) - {"instruction", "input"})
            if extra or "instruction" not in t:
                raise ConfigError(
                    "a phrasing mapping has an 'instruction' and an optional 'input' part",
                    file=name,
                    field=f"{where}.{extra[0]}" if extra else where,
                )
            inp = _check_template(t["input"], name, f"{where}.input") if t.get("input") is not None else None
            phrasings.append(Phrasing(_check_template(t["instruction"], name, f"{where}.instruction"), inp))
        else:
            phrasings.append(Phrasing(_check_template(t, name, where)))
    labels = raw.get("labels")
    if isinstance(labels, list):  # [negative, positive]: the labels are 0, 1, ...
        labels = dict(enumerate(labels))
    if not isinstance(labels, dict) or not labels:
        raise ConfigError(
            "expected a mapping from label to label word, e.g. {0: negative, 1: positive}", file=name, field="labels"
        )
    words: dict[str, str] = {}
    for value, word in labels.items():
        if isinstance(word, bool):  # every output would read "True"/"False", with no error
            raise ConfigError(
                f"the label word is {word}: YAML reads unquoted yes/no/on/off/true/false as booleans; quote it "
                f"({value}: '{'yes' if word else 'no'}')",
                file=name,
                field=f"labels.{value}",
            )
        if not isinstance(word, (str, int, float)) or not str(word).strip():
            raise ConfigError("expected a non-empty label word", file=name, field=f"labels.{value}")
        key = _label_key(value)
        if key in words:  # labels compare as text: a second word would silently replace the first
            raise ConfigError(
                f"label '{key}' appears twice (labels compare as text, so 1, 1.0 and '1' are one label)",
                file=name,
                field=f"labels.{key}",
            )
        words[key] = str(word)
    return LabelTask(str(raw.get("name") or p.stem), phrasings, words, name)


def _label_key(value: object) -> str:
    """Labels compare as text, so JSON 1, CSV "1", YAML 1 and a float column's 1.0 (or a CSV's "1.0") agree, as do
    YAML 1.5 and a CSV's "1.50"; True stays 'True'."""
    if isinstance(value, str) and "." in value:  # "1.0" as a float column writes it, "1.50" a CSV; "007" stays text
        digits = value.strip().lstrip("+-").replace(".", "", 1)
        if digits.isdigit():
            value = float(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _cell(rec: RawRecord, column: str) -> str:
    if column not in rec.data:
        raise record_error(rec, "missing column", column)
    value = rec.data[column]
    if value is None:
        raise record_error(rec, "empty (null)", column)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise record_error(rec, f"expected text, got {type(value).__name__}", column)
    if not value.strip():
        raise record_error(rec, "empty text", column)
    bad = lone_surrogate(value)
    if bad is not None:  # it could not be written as UTF-8 (or trained on): refuse it here, naming the cell
        raise record_error(rec, bad, column)
    return value


def choose_phrasings(index: int, n_phrasings: int, per_example: int, rng: random.Random | None) -> list[int]:
    """Round-robin (`rng` None): the i-th example of a label gets phrasings i*K .. i*K+K-1 (mod n), so each label
    goes round all phrasings (counted over all examples, labels that alternate in the file each kept one
    phrasing, and the phrasing told the label); else K distinct drawn from rng."""
    if rng is None:
        start = index * per_example
        return [(start + j) % n_phrasings for j in range(per_example)]
    return rng.sample(range(n_phrasings), per_example)


def build_from_labels(
    data: str | Path,
    task: LabelTask,
    *,
    label_column: str = "label",
    column_map: dict[str, str] | str | None = None,
    per_example: int = 1,
    seed: int | None = None,
) -> tuple[list[dict], FromLabelsReport]:
    """Alpaca records (instruction, [input], output, meta) for every example of `data`, and a count report.

    With `seed` None phrasings go round-robin; with a seed each example's phrasings are drawn from
    `random.Random(seed)`, so the same seed gives the same file.
    """
    n = len(task.phrasings)
    if not 1 <= per_example <= n:
        raise ConfigError(
            f"must be between 1 and the number of phrasings ({n}), got {per_example}", field="--per-example"
        )
    rng = random.Random(seed) if seed is not None else None
    report = FromLabelsReport(per_phrasing=[0] * n, per_label={v: 0 for v in task.labels})
    records: list[dict] = []
    checked = False
    for i, rec in enumerate(read_rows(data, column_map)):
        if not checked:  # placeholders are checked against the columns of the first record
            _check_placeholders(task, rec, label_column)
            checked = True
        if label_column not in rec.data or rec.data[label_column] is None:
            raise record_error(rec, "missing label", label_column)
        label = _label_key(rec.data[label_column])
        if label not in task.labels:
            hint = ""
            if {"True", "False"} & set(task.labels) and label.lower() in ("yes", "no", "on", "off", "true", "false"):
                hint = "; YAML reads unquoted yes/no/on/off/true/false as booleans: quote the task's labels ('yes':)"
            raise record_error(
                rec, f"unknown label '{label}' (the task knows {', '.join(task.labels)}){hint}", label_column
            )
        chosen = choose_phrasings(report.per_label[label] // per_example, n, per_example, rng)
        cells: dict[str, str] = {}
        for k in sorted(set().union(*(task.phrasings[j].placeholders for j in chosen)) - {OPTIONS}):
            cells[k] = _cell(rec, k)
        cells[OPTIONS] = task.options
        for j in chosen:
            ph = task.phrasings[j]
            out = {"instruction": ph.instruction.format_map(cells)}
            if ph.input is not None:
                out["input"] = ph.input.format_map(cells)
            out["output"] = task.labels[label]
            out["meta"] = {"task": task.name, "phrasing": j, "label": label, "source": rec.source}
            records.append(out)
            report.per_phrasing[j] += 1
            report.per_label[label] += 1
        report.examples += 1
    if not checked:
        raise DataError("no records", file=str(data))
    report.records = len(records)
    return records, report


def _check_placeholders(task: LabelTask, first: RawRecord, label_column: str) -> None:
    columns = sorted(first.data)
    for i, ph in enumerate(task.phrasings):
        if OPTIONS in ph.placeholders and OPTIONS in first.data:  # which one the user means cannot be known
            raise ConfigError(
                f"placeholder {{{OPTIONS}}} lists the task's label words, but {first.file} also has a column "
                f"'{OPTIONS}': rename the column (--map {OPTIONS}=choices) and write {{choices}} for it",
                file=task.file,
                field=f"templates[{i}]",
            )
        for name in sorted(ph.placeholders - {OPTIONS}):
            if name == label_column:
                raise ConfigError(
                    f"placeholder {{{name}}} is the label column: it would put the answer in the prompt",
                    file=task.file,
                    field=f"templates[{i}]",
                )
            if name not in first.data:
                raise ConfigError(
                    f"placeholder {{{name}}} is not a column of {first.file} (columns: {', '.join(columns)})",
                    file=task.file,
                    field=f"templates[{i}]",
                )
