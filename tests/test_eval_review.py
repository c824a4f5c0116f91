"""Evaluation review: defects a user would hit, each proven by a test (code execution, shots, extraction,
bad input, output files)."""

from __future__ import annotations

import json

import pytest

from deltatune.errors import DataError
from deltatune.evaluate.code import CodeProblem
from deltatune.evaluate.execution import Limits, run_program
from deltatune.evaluate.extract import bbh_target, extract_bbh
from deltatune.evaluate.prompts import pick_shots
from deltatune.evaluate.tasks import Item, read_bbh, read_instruction, read_mmlu, read_self_instruct

FAST = Limits(timeout_s=5.0)
ADD = CodeProblem(
    "Toy/0",
    "humaneval",
    'def add(a, b):\n    """Return a + b."""\n',
    "def check(candidate):\n    assert candidate(2, 3) == 5\n",
    "add",
)
SQ = CodeProblem("11", "mbpp", "Square a number.", "assert sq(3) == 9")


# --- code execution: a program that exits before its tests ran has not passed -------------------


@pytest.mark.parametrize(
    "body",
    [
        "    import sys\n    sys.exit(0)\n",
        "    exit()\n",
        "    quit()\n",
        "    raise SystemExit\n",
        "    import os\n    os._exit(0)\n",
    ],
)
def test_a_completion_that_exits_early_does_not_pass(body):
    out = run_program(ADD.program(body), FAST)
    assert not out.passed, out.status
    assert out.status.startswith("failed")


def test_an_mbpp_program_that_exits_at_top_level_does_not_pass():
    program = SQ.program("import sys\ndef sq(x):\n    return -1\nif __name__ == '__main__':\n    sys.exit(0)\n")
    assert not run_program(program, FAST).passed
    # a right solution with the same main guard (which does not run early) still passes, and so does one that
    # prints and leaves buffered output
    right = SQ.program("def sq(x):\n    print('computing', x)\n    return x * x\n")
    assert run_program(right, FAST).passed


# --- few-shot examples never show the evaluated question, even a duplicate of it ----------------


def test_a_duplicate_of_the_item_is_never_a_shot():
    # MMLU's test files repeat some questions word for word (54 such items); shots drawn from the test file
    # must not show the evaluated question with its answer under another line number
    item = Item("What is 2+2?", "A", options=["4", "5", "6", "7"], answer=0, source="t.csv:1", group="g")
    twin = Item("What is 2+2?", "A", options=["4", "5", "6", "7"], answer=0, source="t.csv:9", group="g")
    others = [Item(f"q{i}", "B", options=["a", "b", "c", "d"], answer=1, source=f"t.csv:{i + 20}") for i in range(6)]
    pool = [item, twin, *others]
    for seed in range(30):
        shots = pick_shots(pool, 5, seed=seed, exclude=item)
        assert len(shots) == 5
        assert all(s.prompt != item.prompt for s in shots), seed


def test_shots_are_unchanged_where_no_duplicate_exists():
    pool = [Item(f"q{i}", str(i), source=f"f:{i}") for i in range(12)]
    import random

    for seed in range(5):
        item = pool[seed]
        order = random.Random(seed).sample(range(12), 4)
        expected = [pool[i] for i in order if pool[i] is not item][:3]
        assert pick_shots(pool, 3, seed, exclude=item) == expected


# --- BIG-Bench Hard: a letter in markdown bold is the letter ------------------------------------


@pytest.mark.parametrize("text", ["The answer is **B**.", "**B**", "So the answer is 'B'.", "answer is: *B*"])
def test_bbh_letter_in_bold_or_quotes_is_accepted(text):
    assert extract_bbh(text, bbh_target("(B)")) == "(B)"


@pytest.mark.parametrize("text", ["The answer is **C**.", "I think so"])
def test_bbh_other_letters_or_no_letter_are_still_wrong(text):
    assert extract_bbh(text, bbh_target("(B)")) != "(B)"


# --- bad input: a one-line error naming the file/line, never a traceback or a silent wrong answer --


def test_mmlu_answer_of_two_letters_is_refused(tmp_path):
    path = tmp_path / "x_test.csv"
    path.write_text("What?,a,b,c,d,A\nWhy?,a,b,c,d,BC\n")
    with pytest.raises(DataError, match=r"x_test.csv:2"):
        read_mmlu(path)


def test_non_utf8_task_file_is_a_data_error(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        json.dumps({"instruction": "a", "output": "b"}).encode() + b'\n{"instruction": "caf\xe9", "output": "x"}\n'
    )
    with pytest.raises(DataError, match=r"latin1.jsonl:2.*UTF-8"):
        read_instruction(path)
    csv = tmp_path / "y_test.csv"
    csv.write_bytes(b"Q,a,b,c,d,A\nQ\xe9,a,b,c,d,A\n")
    with pytest.raises(DataError, match=r"y_test.csv:2.*UTF-8"):
        read_mmlu(csv)


@pytest.mark.parametrize("examples", ['["just a string"]', '{"input": "x", "target": "y"}', "3"])
def test_bbh_examples_that_are_not_objects_are_a_data_error(tmp_path, examples):
    path = tmp_path / "task.json"
    path.write_text('{"examples": ' + examples + "}")
    with pytest.raises(DataError, match="task.json"):
        read_bbh(path)


@pytest.mark.parametrize(
    "instances", ['"oops"', '["oops"]', '[{"input": 3, "output": "x"}]'], ids=["str", "list-of-str", "int-input"]
)
def test_self_instruct_bad_instances_are_a_data_error(tmp_path, instances):
    path = tmp_path / "si.jsonl"
    path.write_text('{"instruction": "do it", "instances": ' + instances + "}\n")
    with pytest.raises(DataError, match=r"si.jsonl:1"):
        read_self_instruct(path)


# --- forgetting: the output folder is checked before hours of evaluation, results never replaced ---


def _forgetting_args(tmp_path, out):
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n")
    return [
        "forgetting",
        "--base",
        str(tmp_path / "no-such-model"),  # never loaded: the checks come first
        "--run",
        str(tmp_path),
        "--target",
        f"file:{data}",
        "--source",
        f"file:{data}",
        "--out",
        str(out),
        "--no-progress",
    ]


def test_forgetting_out_that_is_a_file_fails_before_evaluating(tmp_path, capsys, monkeypatch):
    from deltatune.cli import main

    out = tmp_path / "results.txt"
    out.write_text("not a folder\n")
    monkeypatch.setattr("deltatune.evaluate.runs.read_run", lambda p: pytest.fail("read runs before checking --out"))
    assert main(_forgetting_args(tmp_path, out)) == 2
    err = capsys.readouterr().err
    assert "--out" in err or "out" in err
    assert out.read_text() == "not a folder\n"


def test_forgetting_refuses_to_replace_earlier_results(tmp_path, capsys, monkeypatch):
    from deltatune.cli import main

    out = tmp_path / "lf"
    out.mkdir()
    (out / "forgetting.json").write_text("{}\n")
    monkeypatch.setattr("deltatune.evaluate.runs.read_run", lambda p: pytest.fail("read runs before checking --out"))
    assert main(_forgetting_args(tmp_path, out)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "forgetting.json").read_text() == "{}\n"


# --- multiple choice: acc (lm-eval's acc_norm) divides by the option's own character count -------------


def test_char_normalisation_counts_the_options_own_characters_as_lm_eval(tmp_path, tiny_lm, tiny_tok):
    """lm-eval's acc_norm divides each option's log-likelihood by len(choice), the option as written (MMLU has
    133 options with surrounding spaces); stripping them changes the divisor and can change the prediction."""
    import csv

    from deltatune.evaluate.runner import EvalOptions, evaluate_task
    from deltatune.evaluate.tasks import Task

    rows = [
        [f"Question {i}?", "x", "y" + " " * (2 + i), " " * (3 + i) + "z", "w" + " " * (i % 3), "A"] for i in range(12)
    ]
    path = tmp_path / "toy_test.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    task = Task("mmlu:toy", "choice", (path,), "mmlu", "acc")
    res = evaluate_task(tiny_lm.double(), tiny_tok, task, EvalOptions(style="plain", progress=False))
    lm_eval, stripped = [], []
    for row, pred in zip(rows, res.predictions):
        lls = pred["logprobs"]  # rounded to 4 decimals: compare on clear margins only
        options = row[1:5]
        lm_eval.append(max(range(4), key=lambda i: lls[i] / len(options[i])))
        stripped.append(max(range(4), key=lambda i: lls[i] / len(options[i].strip())))
        assert pred["predicted"] == "ABCD"[lm_eval[-1]]
    assert lm_eval != stripped  # the data tell the two conventions apart
    assert res.metrics["acc"] == sum(p == 0 for p in lm_eval) / len(rows)


def test_a_completion_cannot_start_an_unguarded_process_with_posix_spawn(tmp_path):
    # os.posix_spawn started a second Python without the guard (free to delete files) that outlived the sample
    victim = tmp_path / "keep.txt"
    victim.write_text("x")
    code = f"import os; os.remove({str(victim)!r})"
    body = (
        "    import os, sys\n"
        f"    os.posix_spawn(sys.executable, [sys.executable, '-c', {code!r}], {{}})\n"
        "    return a + b\n"
    )
    out = run_program(ADD.program(body), FAST)
    assert not out.passed and "PermissionError" in out.status
    import time

    time.sleep(0.5)
    assert victim.exists()


@pytest.mark.parametrize(
    "text, target, expected",
    [
        ("(A) or (C)", "(A)", False),  # hedging between options is no answer
        ("(A) is wrong, (C) is right.", "(A)", False),
        ("(A) is wrong, (C) is right.", "(C)", False),
        ("So the answer is (C), not (A).", "(C)", False),  # as lm-eval's strict match
        ("(B)\nExplanation: (C) cannot be, since ...", "(B)", True),  # the answer line comes first
        ("Sure!\n(B)", "(B)", True),
        ("(B), yes (B).", "(B)", True),  # the same option twice is one answer
        ("Looking at (A) and (B)...\nSo the answer is (B).", "(B)", True),
    ],
)
def test_bbh_a_line_that_names_several_options_is_no_answer(text, target, expected):
    assert (extract_bbh(text, bbh_target(target)) == bbh_target(target)) is expected


def test_a_question_with_twins_keeps_the_shots_every_other_question_gets():
    """Where twins of the item took two of the k + 1 draws, the shots were drawn again with a larger sample, which
    random.sample makes another sequence altogether: a question with twins got other shots than all the others
    ("the same shots for every question"). The common draw is kept, then the rest of the pool in a fixed order."""
    import random

    pool = [Item(f"q{i}", str(i), source=f"f:{i}") for i in range(40)]
    for seed in range(20):
        order = random.Random(seed).sample(range(40), 4)  # k + 1 = 4 draws for k = 3
        item = pool[order[0]]
        twins = [Item(item.prompt, item.target, source=f"f:{100 + j}") for j in range(2)]
        pool_with_twins = [p if i not in order[1:3] else twins[order[1:3].index(i)] for i, p in enumerate(pool)]
        shots = pick_shots(pool_with_twins, 3, seed, exclude=item)
        assert len(shots) == 3 and all(s.prompt != item.prompt for s in shots)
        assert shots[0] is pool_with_twins[order[3]]  # the common draw's one survivor comes first, as for the others
