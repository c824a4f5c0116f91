"""Code tasks: pass@k against the exact binomial formula, the executor on hand-written right and wrong
solutions (plus timeouts, crashes, spam, writes outside the sandbox), `eval --score` end to end."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from deltatune.evaluate.code import clean_completion, pass_at_k, pass_at_k_table, read_code_problems
from deltatune.evaluate.execution import Limits, run_program, run_programs

ADD = {
    "task_id": "Toy/0",
    "prompt": 'def add(a, b):\n    """Return a + b."""\n',
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}
REV = {
    "task_id": "Toy/1",
    "prompt": 'def rev(s):\n    """Reverse a string."""\n',
    "test": "def check(candidate):\n    assert candidate('abc') == 'cba'\n    assert candidate('') == ''\n",
    "entry_point": "rev",
}
MBPP = [
    {
        "task_id": 11,
        "text": "Write a function to square a number.",
        "code": "def sq(x):\n    return x * x",
        "test_list": ["assert sq(3) == 9", "assert sq(-2) == 4"],
    },
    {
        "task_id": 12,
        "text": "Write a function that returns the maximum of a list.",
        "code": "def big(xs):\n    return max(xs)",
        "test_list": ["assert big([1, 5, 2]) == 5"],
    },
]
FAST = Limits(timeout_s=2.0)


@pytest.fixture
def humaneval_file(tmp_path):
    path = tmp_path / "toy_humaneval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (ADD, REV)))
    return path


@pytest.fixture
def mbpp_file(tmp_path):
    path = tmp_path / "toy_mbpp.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MBPP))
    return path


@pytest.mark.parametrize("n,c,k", [(5, 2, 1), (5, 2, 2), (10, 3, 5), (20, 0, 3), (7, 7, 4), (200, 13, 100)])
def test_pass_at_k_equals_the_binomial_formula(n, c, k):
    exact = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_hand_values_and_table():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    # two problems, 4 samples each: 1 and 3 right -> pass@1 = (0.25 + 0.75) / 2; pass@8 not reportable
    table = pass_at_k_table([(4, 1), (4, 3)], (1, 2, 8))
    assert table == {"pass@1": pytest.approx(0.5), "pass@2": pytest.approx((0.5 + 1.0) / 2)}
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_reads_both_formats_with_ids(humaneval_file, mbpp_file, tmp_path):
    he = read_code_problems(humaneval_file)
    assert [p.task_id for p in he] == ["Toy/0", "Toy/1"] and he[0].format == "humaneval"
    mb = read_code_problems(mbpp_file)
    assert [p.task_id for p in mb] == ["11", "12"] and mb[0].format == "mbpp"
    assert "Your code should pass these tests:\n\nassert sq(3) == 9" in mb[0].generation_prompt()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ADD) + "\n" + json.dumps({"task_id": "x", "prompt": "p"}) + "\n")
    from deltatune.errors import DataError

    with pytest.raises(DataError, match=r"bad.jsonl:2: neither HumanEval"):
        read_code_problems(bad)


def test_right_and_wrong_solutions(humaneval_file, mbpp_file):
    add, rev = read_code_problems(humaneval_file)
    sq, big = read_code_problems(mbpp_file)
    programs = [
        add.program("    return a + b\n"),
        add.program("    return a - b\n"),
        rev.program("    return s[::-1]\n"),
        rev.program("    return s\n"),
        sq.program(MBPP[0]["code"]),
        sq.program("def sq(x):\n    return 2 * x"),
        big.program(MBPP[1]["code"]),
        big.program("def big(xs):\n    return xs[0]"),
    ]
    outcomes = run_programs(programs, FAST, progress=False)
    assert [o.passed for o in outcomes] == [True, False] * 4
    assert outcomes[1].status == "failed: AssertionError"


@pytest.mark.parametrize(
    "body,status",
    [
        ("    while True:\n        pass\n", "timed out"),  # infinite loop
        ("    import time\n    time.sleep(60)\n", "timed out"),  # a sleeper
        ("    import os\n    os.abort()\n", "killed by signal 6"),  # a crash
        ("    return add(a, b)\n", "failed: RecursionError"),  # unbounded recursion
        ("    while True:\n        print('spam' * 1000)\n", "timed out"),  # stdout spam
        ("    x = bytearray(4 * 1024 ** 3)\n    return a + b\n", "failed: MemoryError"),  # over the memory limit
        ("    import socket\n    socket.create_connection(('127.0.0.1', 9))\n", "failed: PermissionError"),
    ],
)
def test_bad_samples_fail_and_never_hang(humaneval_file, body, status):
    add = read_code_problems(humaneval_file)[0]
    start = time.perf_counter()
    out = run_program(add.program(body), FAST)
    assert time.perf_counter() - start < FAST.timeout_s + 5
    assert not out.passed and out.status.startswith(status)


def test_stderr_spam_is_cut_by_the_file_size_limit(humaneval_file):
    add = read_code_problems(humaneval_file)[0]
    start = time.perf_counter()
    out = run_program(
        add.program("    import sys\n    while True:\n        sys.stderr.write('x' * 10000)\n"),
        Limits(timeout_s=30.0, file_mb=1),
    )
    # Python ignores SIGXFSZ: the write past 1 MB raises OSError (EFBIG) and the sample fails, long before 30 s
    assert not out.passed and out.status.startswith("failed") and time.perf_counter() - start < 20


def test_writes_outside_the_temp_folder_are_refused_and_inside_allowed(humaneval_file, tmp_path):
    add = read_code_problems(humaneval_file)[0]
    target = tmp_path / "escaped.txt"
    out = run_program(add.program(f"    open({str(target)!r}, 'w').write('x')\n    return a + b\n"), FAST)
    assert not out.passed and "PermissionError" in out.status and not target.exists()
    inside = run_program(add.program("    open('scratch.txt', 'w').write('x')\n    return a + b\n"), FAST)
    assert inside.passed  # its own empty folder is writable


def test_clean_completion_cuts_humaneval_and_unfences_mbpp(humaneval_file, mbpp_file):
    add = read_code_problems(humaneval_file)[0]
    assert clean_completion(add, "    return a + b\n\ndef other():\n    pass\n") == "    return a + b\n"
    # any top-level `if` ends the function, as lm-eval's `until` has it (only `if __name__` did)
    assert (
        clean_completion(add, "    return a + b\nif add(1, 2) != 3:\n    raise SystemExit(1)\n") == "    return a + b"
    )
    sq = read_code_problems(mbpp_file)[0]
    assert (
        clean_completion(sq, "Here:\n```python\ndef sq(x):\n    return x*x\n```\nDone")
        == "def sq(x):\n    return x*x\n"
    )


@pytest.mark.parametrize(
    "text",
    [" def sq(x):\n    return x * x\n", "  def sq(x):\n      return x * x\n", "\n def sq(x):\n    return x * x\n"],
)
def test_an_unfenced_mbpp_answer_after_a_plain_prompt_runs(mbpp_file, text):
    """A plain prompt ends in "Answer:", so the model's first token is " def": the program opened with an indented
    line and a correct answer failed with IndentationError (pass@1 0 for base models' unfenced answers)."""
    sq = read_code_problems(mbpp_file)[0]
    code = clean_completion(sq, text)
    assert code.lstrip("\n").startswith("def sq(x):\n")
    assert run_program(sq.program(code), FAST).passed


def test_generation_path_scores_the_model_text(humaneval_file, tiny_lm, tiny_tok, monkeypatch):
    from deltatune.evaluate import runner
    from deltatune.evaluate.runner import EvalOptions, evaluate_task
    from deltatune.evaluate.tasks import resolve_task

    seen = {}

    def fake_generate(model, tokenizer, prompts, config, **kw):  # the model "writes" add right, rev wrong
        seen["prompts"], seen["stop"] = prompts, config.stop
        seen["add_special_tokens"] = kw.get("add_special_tokens")
        return ["    return a + b\n\ndef junk():\n    pass\n" if "add" in p else "    return s\n" for p in prompts]

    monkeypatch.setattr(runner, "generate", fake_generate)
    opts = EvalOptions(progress=False, allow_code_execution=True, exec_timeout=5.0)
    res = evaluate_task(tiny_lm, tiny_tok, resolve_task(f"code:{humaneval_file}"), opts)
    assert seen["prompts"] == [ADD["prompt"], REV["prompt"]] and "\ndef" in seen["stop"]
    # encoded with the BOS the tokenizer gives any text, as lm-eval encodes a HumanEval prompt (it had none)
    assert seen["add_special_tokens"] is True
    assert res.metrics == {"pass@1": 0.5} and [r["passed"] for r in res.predictions] == [1, 0]
    from deltatune.errors import UserError

    seen.clear()
    with pytest.raises(UserError, match="allow-code-execution") as refused:
        evaluate_task(tiny_lm, tiny_tok, resolve_task(f"code:{humaneval_file}"), EvalOptions(progress=False))
    assert refused.value.field == "allow-code-execution" and not seen  # refused before anything is generated


def test_eval_score_cli_humaneval_samples_and_mbpp_integer_ids(tmp_path, humaneval_file, mbpp_file, capsys):
    from deltatune.cli import main

    preds = tmp_path / "samples.jsonl"  # HumanEval's convention: one line per sample, ids repeat
    preds.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"task_id": "Toy/0", "completion": "    return a + b\n"},
                {"task_id": "Toy/0", "completion": "    return 0\n"},
                {"task_id": "Toy/1", "completions": ["    return s[::-1]\n", "    return s[::-1]\n"]},
            ]
        )
    )
    out = tmp_path / "res.json"
    rc = main(
        [
            "eval",
            "--score",
            str(preds),
            "--task",
            f"code:{humaneval_file}",
            "--allow-code-execution",
            "--pass-k",
            "1,2",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())["tasks"][f"code:{humaneval_file}"]
    assert res["metrics"] == {"pass@1": pytest.approx(0.75), "pass@2": pytest.approx(1.0)}
    assert res["samples_per_problem"] == 2 and "rlimits" in res["isolation"]
    mb = tmp_path / "mbpp_preds.jsonl"
    mb.write_text(
        json.dumps({"task_id": 11, "completion": MBPP[0]["code"]})
        + "\n"
        + json.dumps({"task_id": "12", "completion": "def big(xs):\n    return min(xs)"})
        + "\n"
    )
    rc = main(
        [
            "eval",
            "--score",
            str(mb),
            "--task",
            f"code:{mbpp_file}",
            "--allow-code-execution",
            "--out",
            str(tmp_path / "mb.json"),
            "--no-progress",
        ]
    )
    assert rc == 0
    assert json.loads((tmp_path / "mb.json").read_text())["tasks"][f"code:{mbpp_file}"]["score"] == 0.5


def test_eval_score_cli_errors_name_file_and_line(tmp_path, humaneval_file, capsys):
    from deltatune.cli import main

    preds = tmp_path / "p.jsonl"
    preds.write_text(
        json.dumps({"task_id": "Toy/0", "completion": "x"})
        + "\n"
        + json.dumps({"task_id": "Toy/9", "completion": "x"})
        + "\n"
    )
    args = ["eval", "--score", str(preds), "--task", f"code:{humaneval_file}", "--no-progress"]
    assert main(args) == 2 and "allow-code-execution" in capsys.readouterr().err  # no opt-in: nothing runs
    assert main(args + ["--allow-code-execution"]) == 2
    assert f"{preds}:2: field 'task_id': task_id 'Toy/9' is not in the task file" in capsys.readouterr().err
    preds.write_text(json.dumps({"task_id": "Toy/0", "completion": "x"}) + "\n")
    assert main(args + ["--allow-code-execution"]) == 2
    assert "no completion for task_id 'Toy/1'" in capsys.readouterr().err
    preds.write_text('{"task_id": "Toy/0", "completion": 3}\n')
    assert main(args + ["--allow-code-execution"]) == 2
    assert f"{preds}:1: needs 'completion'" in capsys.readouterr().err


def test_eval_cli_code_task_fails_before_loading_a_model(tmp_path, humaneval_file, capsys):
    from deltatune.cli import main

    missing_model = str(tmp_path / "no-such-model")  # loading it would fail differently: nothing gets that far
    assert main(["eval", "--model", missing_model, "--task", f"code:{humaneval_file}", "--no-progress"]) == 2
    assert "--allow-code-execution" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "--model",
                missing_model,
                "--task",
                f"code:{humaneval_file}",
                "--allow-code-execution",
                "--samples",
                "4",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "needs sampling: add --sample" in capsys.readouterr().err


def test_a_process_the_sample_leaves_running_is_killed_when_it_ends(monkeypatch):
    """A multiprocessing child the sample does not wait for (its final os._exit skips the join) must not
    outlive the sample: no process is left in the sample's process group."""
    import subprocess

    from deltatune.evaluate import execution

    started = []

    class Recording(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self.pid)

    monkeypatch.setattr(execution.subprocess, "Popen", Recording)
    program = (
        "import multiprocessing, time\n"
        "if __name__ == '__main__':\n"
        "    child = multiprocessing.get_context('spawn').Process(target=time.sleep, args=(60,))\n"
        "    child.start()\n"
        "    time.sleep(0.5)\n"
    )
    out = run_program(program, Limits(timeout_s=20.0))
    assert out.passed, out.status
    group = started[-1]  # the sample (an earlier one may be the namespace check)

    def members() -> list[int]:
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == group:  # pgrp
                pids.append(int(stat.parent.name))
        return pids

    deadline = time.perf_counter() + 5
    while members() and time.perf_counter() < deadline:
        time.sleep(0.1)
    assert members() == []
