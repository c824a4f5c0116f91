"""Code tasks: HumanEval- and MBPP-format problems, the programs that test a completion, pass@k.

HumanEval format (one JSON object a line): `task_id`, `prompt` (signature + docstring), `test`
(defines `check(candidate)`), `entry_point`; a completion continues the prompt, so the program is
prompt + completion + test + `check(entry_point)`.
MBPP format: `text` (the task in words), `code` (a reference solution), `test_list` (assert
lines), optional `task_id` (an integer in MBPP's files; the line number otherwise) and
`test_setup_code`; a completion is the whole program, followed by the asserts.

pass@k is the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained
on Code", eq. 1): with n samples of which c pass, 1 - C(n-c, k) / C(n, k), averaged over problems.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deltatune.errors import DataError

HUMANEVAL_FIELDS = ("task_id", "prompt", "test", "entry_point")
MBPP_FIELDS = ("text", "code", "test_list")
# Codex/HumanEval convention: a continuation ends where a new top-level statement starts
# Codex's and lm-eval's stops exactly (humaneval.yaml: a top-level `if` of any kind ends the function, not only
# `if __name__`; "\ndef" also cuts a top-level `default = ...`, "\nprint" a `printer = ...`, as there), and a
# top-level assert (the model's own tests, which lm-eval runs as part of the sample)
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\nassert ")
_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


@dataclass
class CodeProblem:
    task_id: str  # as in the file; MBPP's integer ids as their decimal text
    format: str  # "humaneval" | "mbpp"
    prompt: str  # HumanEval: the code to continue; MBPP: the task in words
    test: str  # HumanEval: the check() definition; MBPP: the assert lines
    entry_point: str = ""
    setup: str = ""  # MBPP's test_setup_code
    source: str = ""  # file:line

    def program(self, completion: str) -> str:
        """The program whose exit status says whether `completion` is right."""
        if self.format == "humaneval":
            return f"{self.prompt}{completion}\n\n{self.test}\n\ncheck({self.entry_point})\n"
        return f"{self.setup}\n{completion}\n\n{self.test}\n"

    def generation_prompt(self) -> str:
        """What the model sees: HumanEval's code as is; MBPP's prompt of the original paper (task + tests)."""
        if self.format == "humaneval":
            return self.prompt
        return (
            f"You are an expert Python programmer, and here is your task: {self.prompt} "
            f"Your code should pass these tests:\n\n{self.test}\n"
        )


def detect_format(record: dict) -> str | None:
    if all(k in record for k in HUMANEVAL_FIELDS):
        return "humaneval"
    if all(k in record for k in MBPP_FIELDS):
        return "mbpp"
    return None


def read_code_problems(path: Path) -> list[CodeProblem]:
    """Every problem of a HumanEval- or MBPP-format JSONL file (the first record decides the format)."""
    problems: list[CodeProblem] = []
    fmt = None
    seen: dict[str, int] = {}
    from deltatune.evaluate.tasks import jsonl_records

    for n, r in jsonl_records(path):
        this = detect_format(r)
        if this is None:
            raise DataError(
                f"neither HumanEval ({', '.join(HUMANEVAL_FIELDS)}) nor MBPP ({', '.join(MBPP_FIELDS)}) fields",
                file=str(path),
                line=n,
            )
        fmt = fmt or this
        if this != fmt:
            raise DataError(f"a {this} record in a {fmt} file", file=str(path), line=n)
        problems.append(_problem(r, fmt, path, n))
        if problems[-1].task_id in seen:
            raise DataError(
                f"task_id {problems[-1].task_id!r} repeats line {seen[problems[-1].task_id]}",
                file=str(path),
                line=n,
                field="task_id",
            )
        seen[problems[-1].task_id] = n
    if not problems:
        raise DataError("no problems in the file", file=str(path))
    return problems


def _problem(r: dict, fmt: str, path: Path, n: int) -> CodeProblem:
    def text(key: str) -> str:
        if not isinstance(r.get(key), str):
            raise DataError("missing or not a string", file=str(path), line=n, field=key)
        return r[key]

    if fmt == "humaneval":
        return CodeProblem(
            task_id_text(r["task_id"], path, n),
            fmt,
            text("prompt"),
            text("test"),
            text("entry_point"),
            source=f"{path}:{n}",
        )
    tests = r["test_list"]
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise DataError("expected a non-empty list of assert strings", file=str(path), line=n, field="test_list")
    setup = r.get("test_setup_code") or ""
    task_id = task_id_text(r["task_id"], path, n) if "task_id" in r else str(n)
    return CodeProblem(task_id, fmt, text("text"), "\n".join(tests), setup=str(setup), source=f"{path}:{n}")


def task_id_text(value, path: Path | str, line: int) -> str:
    """A task id as text: strings as they are, integers (MBPP) in decimal; anything else is an error."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError("task_id must be a string or an integer", file=str(path), line=line, field="task_id")
    return str(value)


def clean_completion(problem: CodeProblem, text: str) -> str:
    """A generated text -> the code to run: the fenced block if the text opens one; else the code before a
    closing fence (a continuation that ran past its block's end into prose); HumanEval cut at a new top-level."""
    m = _FENCE.search(text)
    if m and _closes_code(problem, text, m):
        text, m = text[: m.start()], None
    if problem.format == "mbpp":
        return m.group(1) if m else _at_column_zero(text)
    if m:  # a chat model wrote the whole function in a fence: use it after the prompt (it redefines the function)
        return "\n" + m.group(1)
    cut = len(text)
    for stop in HUMANEVAL_STOP:
        i = text.find(stop)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


def _at_column_zero(code: str) -> str:
    """An unfenced MBPP answer as a program: a plain prompt ends in "Answer:", so the model's first token is " def"
    and the program opened with an indented line (IndentationError, a correct answer scored 0). The whole text is
    dedented, then a first line still indented alone (its body at its own depth) loses that indent."""
    import textwrap

    code = textwrap.dedent(code)
    lines = code.split("\n")
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is not None:
        lines[first] = lines[first].lstrip(" \t")
    return "\n".join(lines)


def _closes_code(problem: CodeProblem, text: str, fence: re.Match) -> bool:
    """Whether the first fence closes code the text began with rather than opening a block: it names no language,
    and the text before it is code (it compiles, after the HumanEval prompt it continues); prose before a fence
    ("Here is the code:") does not compile, and a text that starts with a fence opens one."""
    before = text[: fence.start()]
    if not before.strip() or not re.match(r"```[ \t]*\n", text[fence.start() :]):
        return False
    source = (problem.prompt if problem.format == "humaneval" else "") + before
    with warnings.catch_warnings():  # a completion's invalid escapes are not ours to report
        warnings.simplefilter("ignore")
        try:
            compile(source, "<completion>", "exec")
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return False
    return True


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: 1 - C(n-c, k)/C(n, k), computed as a stable product."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_table(counts: list[tuple[int, int]], ks: tuple[int, ...]) -> dict[str, float]:
    """{'pass@1': ..., 'pass@k': ...} averaged over problems, for every k not above the fewest samples."""
    fewest = min(n for n, _ in counts)
    out = {}
    for k in sorted(set(ks) | {1}):
        if k <= fewest:
            out[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for n, c in counts]))
    return out
