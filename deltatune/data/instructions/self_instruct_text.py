"""Self-Instruct's prompts, the parsing of what the model writes, and the paper's instruction filters.

Wang et al. 2023 (arXiv:2212.10560) and their code: 8 in-context tasks per prompt (6 human seed
tasks, 2 generated ones once there are some), a yes/no classification question with few-shot
examples, instances generated input-first, or output-first for classification tasks (so that every
class label gets an input instead of the model's favourite one).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from deltatune.data.formats import lone_surrogate
from deltatune.data.instructions.rows import read_rows, record_error
from deltatune.errors import DataError


@dataclass
class Task:
    instruction: str
    instances: list[dict] = field(default_factory=list)  # {"input": str, "output": str}
    is_classification: bool = False

    def to_json(self) -> dict:
        return {
            "instruction": self.instruction,
            "instances": self.instances,
            "is_classification": self.is_classification,
        }


def read_seed_tasks(path: str | Path) -> list[Task]:
    """Seed tasks in self-instruct's format: instruction, instances [{input, output}], is_classification."""
    tasks = []
    for rec in read_rows(path):
        d = rec.data
        ins = d.get("instruction")
        if not isinstance(ins, str) or not ins.strip():
            raise record_error(rec, "missing" if ins is None else "expected non-empty text", "instruction")
        raw = d.get("instances")
        if not isinstance(raw, list) or not raw:
            raise record_error(rec, "expected a non-empty list of {input, output}", "instances")
        instances = []
        for i, inst in enumerate(raw):
            if (
                not isinstance(inst, dict)
                or not isinstance(inst.get("output"), str)
                or not isinstance(inst.get("input", ""), str)
            ):
                raise record_error(rec, "expected {input: text, output: text}", f"instances[{i}]")
            instances.append({"input": inst.get("input", ""), "output": inst["output"]})
        clf = d.get("is_classification", False)
        if not isinstance(clf, bool):
            raise record_error(rec, f"expected true or false, got {type(clf).__name__}", "is_classification")
        texts = {"instruction": ins, **{f"instances[{i}]": v for i, x in enumerate(instances) for v in x.values()}}
        for name, text in texts.items():  # the tokenizer's TypeError after the model loaded, a work folder left
            bad = lone_surrogate(text)
            if bad is not None:
                raise record_error(rec, bad, name)
        tasks.append(Task(ins.strip(), instances, clf))
    if not tasks:
        raise DataError("no seed tasks", file=str(path))
    return tasks


# ---------------------------------------------------------------- prompts

INSTRUCTION_HEADER = "Come up with a series of tasks:\n"
CLASSIFY_HEADER = "Can the following task be regarded as a classification task with finite output labels?\n\n"
INPUT_FIRST_HEADER = (
    "Come up with examples for the following tasks. Try to generate multiple examples when possible. "
    "If the task doesn't require additional input, you can generate the output directly.\n\n"
)
OUTPUT_FIRST_HEADER = (
    "Given the classification task definition and the class labels, generate an input that "
    "corresponds to each of the class labels. If the task doesn't require input, just generate "
    "the correct class label.\n\n"
)
INSTRUCTION_STOP = ("\n\n",)
CLASSIFY_STOP = ("\n",)
INSTANCE_STOP = ("\nTask:", "\n\n\n")


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().rstrip(":")


def instruction_prompt(instructions: list[str]) -> str:
    """A numbered list of tasks ending in the next number, for the model to continue."""
    body = "".join(f"{i + 1}. {_one_line(ins)}\n" for i, ins in enumerate(instructions))
    return f"{INSTRUCTION_HEADER}{body}{len(instructions) + 1}."


def classify_prompt(shots: list[Task], instruction: str) -> str:
    body = "".join(
        f"Task: {_one_line(t.instruction)}\nIs it classification? {'Yes' if t.is_classification else 'No'}\n\n"
        for t in shots
    )
    return f"{CLASSIFY_HEADER}{body}Task: {_one_line(instruction)}\nIs it classification?"


def instance_prompt(shots: list[Task], instruction: str, classification: bool) -> str:
    """Input-first (Task, Input, Output), or output-first for classification (Task, Class label, Input)."""
    parts = []
    for t in shots:
        inst = t.instances[0]
        if classification:
            body = f"Class label: {inst['output'].strip()}\n" + (
                f"Input: {inst['input'].strip()}\n" if inst["input"].strip() else ""
            )
        else:
            body = (
                f"Input: {inst['input'].strip()}\n" if inst["input"].strip() else ""
            ) + f"Output: {inst['output'].strip()}\n"
        parts.append(f"Task: {_one_line(t.instruction)}\n{body}\n")
    header = OUTPUT_FIRST_HEADER if classification else INPUT_FIRST_HEADER
    tail = "Class label:" if classification else ""
    return f"{header}{''.join(parts)}Task: {_one_line(instruction)}\n{tail}"


# ---------------------------------------------------------------- parsing


def parse_instructions(response: str) -> list[str]:
    """The instructions in a continuation of `instruction_prompt`: the first one follows the prompt's
    last number, later ones start their own numbered lines."""
    return [_one_line(p) for p in re.split(r"\n\s*\d+\s?\.\s", response)]


def parse_is_classification(response: str) -> bool:
    return response.strip().lower().startswith("yes")


_INPUT_FIRST = re.compile(r"(?:Input:(?P<input>.*?))?Output:(?P<output>.*?)(?=\nInput:|\nOutput:|$)", re.S)
_OUTPUT_FIRST = re.compile(r"Class label:(?P<output>.*?)(?:\nInput:(?P<input>.*?))?(?=\nClass label:|$)", re.S)


def parse_instances(response: str, classification: bool) -> list[dict]:
    """Every (input, output) pair the model wrote; for output-first the response follows "Class label:"."""
    if classification:
        matches = _OUTPUT_FIRST.finditer("Class label:" + response)
    else:
        matches = _INPUT_FIRST.finditer(response)
    return [{"input": (m.group("input") or "").strip(), "output": (m.group("output") or "").strip()} for m in matches]


# ---------------------------------------------------------------- filters

# Things a text-only model cannot do or see (the paper's list, with Alpaca's additions).
UNANSWERABLE_WORDS = (
    "image",
    "images",
    "graph",
    "graphs",
    "picture",
    "pictures",
    "file",
    "files",
    "map",
    "maps",
    "draw",
    "plot",
    "go to",
    "video",
    "audio",
    "music",
    "flowchart",
    "diagram",
)
_UNANSWERABLE = re.compile(r"\b(" + "|".join(re.escape(w) for w in UNANSWERABLE_WORDS) + r")\b", re.I)
MIN_WORDS, MAX_WORDS = 4, 150  # the paper keeps 3 < words <= 150


def instruction_drop_reason(ins: str) -> str | None:
    """Why the paper's heuristics reject an instruction, or None to keep it."""
    if not ins:
        return "empty"
    words = len(ins.split())
    if words < MIN_WORDS:
        return "too_short"
    if words > MAX_WORDS:
        return "too_long"
    if _UNANSWERABLE.search(ins):
        return "unanswerable"  # needs images, files, graphs, ... that a language model has no access to
    if ins.startswith("Write a program"):
        return "write_a_program"  # the paper's: ambiguous whether to write or to run the program
    if ins[0] in string.punctuation:
        return "starts_with_punctuation"
    if not ins[0].isascii():
        return "not_english"
    return None


def clean_instances(instances: list[dict]) -> list[dict]:
    """Drop empty outputs, outputs that repeat the input, and repeated instances (the paper's instance filters)."""
    seen, out = set(), []
    for inst in instances:
        key = (inst["input"], inst["output"])
        if not inst["output"] or inst["output"] == inst["input"] or key in seen:
            continue
        seen.add(key)
        out.append(inst)
    return out
