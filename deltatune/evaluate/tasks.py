"""Built-in task definitions: a small declarative record per task (files, format, metric, extraction).

Task names on the command line:
  gsm8k                 GSM8K test, generation, exact match on the `#### N` number (shots from train)
  mmlu, mmlu:SUBJECT    MMLU test CSVs, multiple choice by option likelihood (or letters)
  bbh, bbh:TASK         BIG-Bench Hard, generation, exact match after BBH extraction
  self-instruct         252 user-oriented instructions, ROUGE-L against the reference output
  file:PATH             your JSONL with `instruction` (+ optional `input`) and `output` (renamed by `--map`)
  loss:PATH             held-out loss/perplexity of any training-format file (template + loss policy)
  code:PATH             HumanEval- or MBPP-format JSONL, pass@1 / pass@k by running the programs
                        (only with --allow-code-execution; see evaluate/execution.py)
The data root is ../shared/data beside the repository, else $DELTATUNE_DATA, else --data-root.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltatune.errors import DataError, UserError
from deltatune.evaluate.extract import bbh_target, gsm8k_target

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# GSM8K at 0 shots (chat models): no example shows the answer format, so the prompt states it; the
# headline strict match then reads the number after '####' exactly as with few-shot prompts
GSM8K_ZERO_SHOT = "\n\nSolve the problem step by step. On the last line, write the final answer as '#### <number>'."


@dataclass
class Item:
    """One question. `prompt` is the user's turn; `shot_answer` is shown when it is a few-shot example."""

    prompt: str
    target: str
    shot_answer: str = ""
    options: list[str] | None = None
    answer: int | None = None  # index of the correct option
    source: str = ""  # "file:line" for error messages and the predictions file
    group: str = ""  # file stem (MMLU subject, BBH task): few-shot examples come from the same group
    problem: Any = None  # code tasks: the CodeProblem (program builder, task_id)


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "generate" | "choice" | "loss" | "code"
    files: tuple[Path, ...]
    format: str  # reader: "gsm8k" | "mmlu" | "bbh" | "self-instruct" | "instruction"
    metric: str  # headline metric key in the results
    extract: str = "text"  # "gsm8k" | "bbh" | "text"
    fewshot_files: tuple[Path, ...] = ()  # empty: shots come from the task's own items, never the item itself
    max_new_tokens: int = 256
    zero_shot_suffix: str = ""  # appended to the question when no shots show the answer format
    field_map: dict[str, str] = field(default_factory=dict, hash=False, compare=False)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def data_root(override: str | os.PathLike | None = None) -> Path:
    """--data-root, else $DELTATUNE_DATA, else ../shared/data relative to the repository."""
    if override:
        root, how = Path(override), "--data-root"
    elif os.environ.get("DELTATUNE_DATA"):
        root, how = Path(os.environ["DELTATUNE_DATA"]), "$DELTATUNE_DATA"
    else:
        root, how = repo_root().parent / "shared" / "data", "the default ../shared/data"
    if not root.is_dir():
        raise UserError(f"data root {root} ({how}) does not exist; set DELTATUNE_DATA or pass --data-root")
    return root


def _need(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"{path}: task data file not found (check --data-root / $DELTATUNE_DATA)")
    return path


def _choose(folder: Path, suffix: str, part: str, kind: str) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"{folder}: {kind} data folder not found (check --data-root / $DELTATUNE_DATA)")
    names = sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}"))
    if not part:
        return [folder / f"{n}{suffix}" for n in names]
    chosen = [s.strip() for s in part.split("+") if s.strip()]
    unknown = [s for s in chosen if s not in names]
    if unknown:
        raise UserError(f"unknown {kind} subject '{unknown[0]}'; choose from: {', '.join(names)}", field="task")
    return [folder / f"{n}{suffix}" for n in chosen]


FILE_FIELDS = ("instruction", "input", "output")  # what a file: task reads
RECORD_FIELDS = (*FILE_FIELDS, "messages", "prompt", "completion", "text", "system")  # any training format (loss:)


def parse_field_map(text: str | None) -> dict[str, str]:
    """--map as train, preview and stats write it, COLUMN=FIELD ('question=instruction,answer=output'), or as eval
    first took it, FIELD=COLUMN ('instruction=question'): {field: column} either way. The side that names a field
    says which is which; an entry naming fields on both sides is refused rather than guessed."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        left, sep, right = (x.strip() for x in part.partition("="))
        if not sep or not left or not right:
            raise UserError(f"bad --map entry '{part}': use COLUMN=FIELD, e.g. question=instruction", field="map")
        if right in RECORD_FIELDS and left not in RECORD_FIELDS:
            out[right] = left
        elif left in RECORD_FIELDS and right not in RECORD_FIELDS:
            out[left] = right
        elif left != right:
            raise UserError(
                f"bad --map entry '{part}': name a column of the file and a field ({', '.join(RECORD_FIELDS)})"
                f"{' on each side' if left in RECORD_FIELDS else ''}, as COLUMN=FIELD",
                field="map",
            )
    return out


def resolve_task(spec: str, root: str | os.PathLike | None = None, field_map: dict[str, str] | None = None) -> Task:
    """A task name (see the module docstring) -> its definition. Data is read later by `load_items`."""
    name, _, part = spec.strip().partition(":")
    if name == "loss":
        return Task(spec, "loss", (_need(Path(part).expanduser()),), "records", "loss", field_map=dict(field_map or {}))
    if name == "code":
        return Task(spec, "code", (_need(Path(part).expanduser()),), "code", "pass@1", max_new_tokens=512)
    if name == "file":
        path = _need(Path(part).expanduser())
        unread = sorted(set(field_map or {}) - set(FILE_FIELDS))
        if unread:
            raise UserError(
                f"--map names '{unread[0]}', which a file: task does not read ({', '.join(FILE_FIELDS)}); "
                "a loss: task reads any training format",
                field="map",
            )
        return Task(
            spec,
            "generate",
            (path,),
            "instruction",
            "rouge_l",
            "text",
            max_new_tokens=256,
            field_map=dict(field_map or {}),
        )
    base = data_root(root)
    if name == "gsm8k":
        return Task(
            spec,
            "generate",
            (_need(base / "gsm8k" / "test.jsonl"),),
            "gsm8k",
            "exact_match",
            "gsm8k",
            fewshot_files=(base / "gsm8k" / "train.jsonl",),
            max_new_tokens=256,
            zero_shot_suffix=GSM8K_ZERO_SHOT,
        )
    if name == "mmlu":
        return Task(spec, "choice", tuple(_choose(base / "mmlu", "_test.csv", part, "mmlu")), "mmlu", "acc")
    if name == "bbh":
        return Task(
            spec,
            "generate",
            tuple(_choose(base / "bbh", ".json", part, "bbh")),
            "bbh",
            "exact_match",
            "bbh",
            max_new_tokens=64,
        )
    if name == "self-instruct":
        folder = base / "self-instruct"
        return Task(
            spec,
            "generate",
            (_need(folder / "user_oriented_instructions.jsonl"),),
            "self-instruct",
            "rouge_l",
            "text",
            fewshot_files=(folder / "seed_tasks.jsonl",),
            max_new_tokens=256,
        )
    raise UserError(
        f"unknown task '{spec}'; use gsm8k, mmlu[:subject], bbh[:task], self-instruct, file:PATH "
        "loss:PATH or code:PATH",
        field="task",
    )


# --- readers: one per format, each returning Items ---------------------------------------------


def read_utf8(path: Path) -> str:
    """The file's text; a byte that is not UTF-8 is a DataError naming its line, not a traceback."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8", file=str(path), line=line
        ) from None


def jsonl_records(path: Path):
    """(line number, record) of each non-blank line of a UTF-8 JSONL file; a line that is not a JSON object is one
    DataError naming the file and line."""
    for n, line in enumerate(io.StringIO(read_utf8(path), newline=None), 1):  # lines as open() splits them
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"not valid JSON ({exc.msg})", file=str(path), line=n) from exc
        if not isinstance(record, dict):
            raise DataError("expected a JSON object per line", file=str(path), line=n)
        yield n, record


def _field(record: dict, key: str, path: Path, line: int) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise DataError("missing or not a string", file=str(path), line=line, field=key)
    return value


def read_gsm8k(path: Path) -> list[Item]:
    items = []
    for n, r in jsonl_records(path):
        answer = _field(r, "answer", path, n)
        try:
            target = gsm8k_target(answer)
        except ValueError as exc:
            raise DataError("answer has no '#### N' line", file=str(path), line=n, field="answer") from exc
        items.append(Item(_field(r, "question", path, n), target, answer, source=f"{path}:{n}"))
    return items


def read_mmlu(path: Path) -> list[Item]:
    items = []
    with io.StringIO(read_utf8(path), newline="") as fh:
        for n, row in enumerate(csv.reader(fh), 1):
            if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
                raise DataError("expected 6 columns: question, A, B, C, D, answer letter", file=str(path), line=n)
            answer = LETTERS.index(row[5].strip())
            # the question stripped as lm-eval's MMLU templates do (`question.strip()`): 963 test questions start
            # or end with whitespace (nutrition's end in a newline); the options stay as written, as lm-eval's
            question = row[0].strip()
            items.append(
                Item(question, row[5].strip(), row[1 + answer], options=row[1:5], answer=answer, source=f"{path}:{n}")
            )
    return items


def read_bbh(path: Path) -> list[Item]:
    try:
        examples = json.loads(read_utf8(path))["examples"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError('expected {"examples": [{"input", "target"}]}', file=str(path)) from exc
    if not isinstance(examples, list):
        raise DataError('expected {"examples": [{"input", "target"}]}', file=str(path), field="examples")
    items = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str) or not isinstance(ex.get("target"), str):
            raise DataError("example needs string 'input' and 'target'", file=str(path), field=f"examples[{i}]")
        items.append(Item(ex["input"], bbh_target(ex["target"]), ex["target"], source=f"{path}#{i}"))
    return items


def read_self_instruct(path: Path) -> list[Item]:
    items = []
    for n, r in jsonl_records(path):
        instances = r.get("instances") or [{}]
        if not isinstance(instances, list) or not isinstance(instances[0], dict):
            raise DataError("expected a list of objects", file=str(path), line=n, field="instances")
        inst = instances[0]
        prompt = _field(r, "instruction", path, n)
        if inst.get("input"):
            if not isinstance(inst["input"], str):
                raise DataError("not a string", file=str(path), line=n, field="instances[0].input")
            prompt += "\n\n" + inst["input"]
        output = inst.get("output")
        if not isinstance(output, str):
            raise DataError("instance without an output", file=str(path), line=n, field="instances[0].output")
        items.append(Item(prompt, output, output, source=f"{path}:{n}"))
    return items


def read_instruction(path: Path, field_map: dict[str, str] | None = None) -> list[Item]:
    fm = {"instruction": "instruction", "input": "input", "output": "output", **(field_map or {})}
    items = []
    for n, r in jsonl_records(path):
        prompt = _field(r, fm["instruction"], path, n)
        extra = r.get(fm["input"])
        if isinstance(extra, str) and extra:
            prompt += "\n\n" + extra
        output = _field(r, fm["output"], path, n)
        items.append(Item(prompt, output, output, source=f"{path}:{n}"))
    return items


def read_code(path: Path) -> list[Item]:
    from deltatune.evaluate.code import read_code_problems

    return [Item(p.generation_prompt(), p.task_id, source=p.source, problem=p) for p in read_code_problems(path)]


def _read(fmt: str, path: Path, field_map: dict[str, str]) -> list[Item]:
    if fmt == "code":
        return read_code(path)
    if fmt == "instruction":
        return read_instruction(path, field_map)
    return {"gsm8k": read_gsm8k, "mmlu": read_mmlu, "bbh": read_bbh, "self-instruct": read_self_instruct}[fmt](path)


def load_items(task: Task, limit: int | None = None) -> list[Item]:
    """The task's items; `limit` applies per file (per MMLU subject / BBH task), in file order.

    Loss tasks have no items (the data path reads them with the tokenizer): an empty list.
    """
    if task.kind == "loss":
        return []
    items: list[Item] = []
    for path in task.files:
        part = _read(task.format, path, task.field_map)
        for item in part:
            item.group = path.stem.removesuffix("_test")
        items.extend(part[:limit] if limit else part)
    if not items:
        raise UserError(f"task '{task.name}' has no examples", field="task")
    return items


def load_shot_pool(task: Task) -> list[Item] | None:
    """Items of the task's training split, or None when shots come from the task's own items."""
    if not task.fewshot_files:
        return None
    pool: list[Item] = []
    for path in task.fewshot_files:
        pool.extend(
            _read(task.format if task.format != "self-instruct" else "self-instruct", _need(path), task.field_map)
        )
    return pool
