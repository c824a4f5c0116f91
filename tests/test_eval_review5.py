"""Review of evaluation (fifth pass, notes/review_eval.md): each test failed before its fix."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from deltatune.evaluate.code import CodeProblem, clean_completion
from deltatune.evaluate.execution import Limits, run_program
from deltatune.evaluate.extract import extract_bbh, extract_gsm8k

REPO = Path(__file__).resolve().parent.parent
FAST = Limits(timeout_s=5.0)
ADD = CodeProblem(
    "t", "humaneval", 'def add(a, b):\n    """Return a + b."""\n', "def check(c):\n    assert c(1, 2) == 3\n", "add"
)
MBPP_ADD = CodeProblem("1", "mbpp", "Write add.", "assert add(1, 2) == 3")


# --- 1. numeric libraries import in a sample ---------------------------------------------------


def test_a_numpy_solution_passes():
    """numpy 2 calls os.putenv at import, which the guard disables: every numpy sample failed."""
    out = run_program("import numpy as np\nassert np.arange(3).sum() == 3\n", FAST)
    assert out.passed, out.status


def test_putenv_stays_disabled_for_the_model_code():
    out = run_program("import os\nos.putenv('X', '1')\n", FAST)
    assert not out.passed and "guard" in out.status


# --- 2. Ctrl-C while samples run ---------------------------------------------------------------


class _InterruptingBar:
    """A progress bar whose first update raises KeyboardInterrupt, as Ctrl-C does while results are awaited."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def update(self, n: int) -> None:
        raise KeyboardInterrupt

    def close(self) -> None:
        pass


SLEEPER = "import time\ntime.sleep(100)\n"


def test_ctrl_c_cancels_queued_samples_and_kills_running_ones(monkeypatch):
    """The pool's exit waited for every queued sample (each up to the timeout) before Ctrl-C took effect."""
    from deltatune.evaluate import execution

    monkeypatch.setattr(execution, "tqdm", _InterruptingBar)
    programs = ["import time\ntime.sleep(0.5)\n", SLEEPER, SLEEPER, SLEEPER, SLEEPER]
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        execution.run_programs(programs, Limits(timeout_s=8.0), workers=2)
    # the second worker's sleeper ran when the interrupt came: killed, not waited for (8 s), nor the queue
    assert time.perf_counter() - start < 4.0


def test_ctrl_c_in_eval_score_exits_130_promptly(tmp_path, monkeypatch, capsys):
    from deltatune.cli import main
    from deltatune.evaluate import execution

    monkeypatch.setattr(execution, "tqdm", _InterruptingBar)
    task = tmp_path / "he.jsonl"
    rows = [{"task_id": f"t{i}", "prompt": ADD.prompt, "test": ADD.test, "entry_point": "add"} for i in range(4)]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = tmp_path / "s.jsonl"
    bodies = ["    import time; time.sleep(0.5); return a + b\n"] + ["    import time; time.sleep(100)\n"] * 3
    samples.write_text("\n".join(json.dumps({"task_id": f"t{i}", "completion": b}) for i, b in enumerate(bodies)))
    start = time.perf_counter()
    code = main(
        [
            "eval", "--score", str(samples), "--task", f"code:{task}", "--allow-code-execution",
            "--exec-workers", "2", "--exec-timeout", "8", "--no-progress",
        ]
    )  # fmt: skip
    assert code == 130
    assert time.perf_counter() - start < 4.0


# --- 3. a continuation that closes a fence -----------------------------------------------------


def test_code_before_a_closing_fence_is_the_completion():
    """The text after a closing fence (prose) was taken as the program: a SyntaxError."""
    text = "    return a + b\n```\n\nThis function adds two numbers.\n"
    completion = clean_completion(ADD, text)
    assert completion == "    return a + b\n"
    assert run_program(ADD.program(completion), FAST).passed
    mbpp = "def add(a, b):\n    return a + b\n```\n\nThis function adds two numbers."
    assert clean_completion(MBPP_ADD, mbpp) == "def add(a, b):\n    return a + b\n"


@pytest.mark.parametrize(
    "text",
    [
        "Here is the code:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.",
        "Here is the code:\n```\ndef add(a, b):\n    return a + b\n```\nDone.",
        "```python\ndef add(a, b):\n    return a + b\n```",
    ],
)
def test_a_reply_that_opens_a_fence_keeps_the_fenced_code(text):
    assert clean_completion(MBPP_ADD, text) == "def add(a, b):\n    return a + b\n"
    assert clean_completion(ADD, text) == "\ndef add(a, b):\n    return a + b\n"


# --- 4. MMLU questions stripped as lm-eval strips them -----------------------------------------


def test_mmlu_questions_and_shots_are_stripped(tmp_path, tiny_tok):
    from deltatune.evaluate.prompts import render
    from deltatune.evaluate.tasks import read_mmlu

    path = tmp_path / "nutrition_test.csv"
    path.write_text('" What is it?\n",a,b,c,d,A\n"  Which one? ",a,b,c,d,B\n')
    items = read_mmlu(path)
    assert [it.prompt for it in items] == ["What is it?", "Which one?"]
    prompt = render(tiny_tok, "plain", [(items[1].prompt, "b")], items[0].prompt)
    assert prompt == "Question: Which one?\nAnswer: b\n\nQuestion: What is it?\nAnswer:"


def test_docs_say_where_mmlu_differs_from_lm_eval():
    text = (REPO / "docs" / "evaluation.md").read_text()
    section = text[text.index("### How deltatune's MMLU differs from lm-eval's") :]
    for phrase in ("description line", "--choice letter", "`acc_norm`", "question.strip()"):
        assert phrase in section[:3000], phrase


# --- 5. BBH multiple choice: no credit for an article or a walk through the options ------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A dog would do that.", None),
        ("I think so.", None),
        ("Let me check each option.\n(A) 12/01/2019 is too early.\n(B) 12/02/2019 matches the clue.\nSo B is correct.", "(B)"),
        ("(A) 12/01/2019 is too early.\n(B) 12/02/2019 matches.\n(C) 12/03/2019 is too late.", None),
        ("(B)\nBecause (A) is too early.", "(B)"),
        ("The answer is A because the clue says so.", "(A)"),
        ("B) The specialist had a skin condition", "(B)"),
    ],
)  # fmt: skip
def test_bbh_multiple_choice_extraction_is_strict(text, expected):
    """A reply opening with the article 'A' was option (A); a walk through the options was its first."""
    got = extract_bbh(text, "(B)")
    if expected is None:
        assert not (got.startswith("(") and got.endswith(")") and len(got) == 3), got
    else:
        assert got == expected


# --- 6. GSM8K numbers as lm-eval's regexes read them -------------------------------------------


@pytest.mark.parametrize(
    "text, strict, flexible",
    [
        ("She has:\n- 72", None, "72"),
        ("so she pays 50 - 5", None, "5"),
        ("so -3 is left", None, "-3"),
        ("... #### 7\n#### 8", "7", "8"),
        ("####18", None, "18"),
        ("#### $5", None, "5"),
        ("#### 1,000.", "1000", "1000"),
    ],
)
def test_gsm8k_strict_and_flexible_follow_lm_eval(text, strict, flexible):
    assert extract_gsm8k(text, strict=True) == strict
    assert extract_gsm8k(text, strict=False) == flexible


# --- 7 and 9. results.json records every setting; --max-len's drops are reported ---------------


def _loss_file(tmp_path: Path) -> Path:
    """Two short records and one whose question alone is longer than --max-len 24."""
    rows = [
        {"question": "What is 2 + 3?", "answer": "5"},
        {"question": "Say fox " * 40, "answer": "the fox"},
        {"question": "Say hi", "answer": "hi"},
    ]
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _eval(main, capsys, *args) -> tuple[int, str, str]:
    code = main(["eval", *args, "--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_results_record_every_setting_that_changes_scores(tmp_path, tiny_dir, shared_data, capsys):
    from deltatune.cli import main

    data, out = _loss_file(tmp_path), tmp_path / "r.json"
    code, _, _ = _eval(
        main, capsys, "--model", str(tiny_dir), "--task", f"gsm8k,loss:{data}", "--limit", "1",
        "--max-new-tokens", "3", "--sample", "--temperature", "0.9", "--top-p", "0.95", "--max-len", "24",
        "--policy", "all", "--map", "question=instruction,answer=output", "--data-root", str(shared_data),
        "--out", str(out),
    )  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    options = result["options"]
    assert options["prompt_style"] == "chat"  # resolved from the tokenizer, not the flag's None
    assert options["max_new_tokens"] == 3 and options["temperature"] == 0.9 and options["top_p"] == 0.95
    assert options["data_root"] == str(shared_data)
    assert (options["template"], options["policy"], options["max_len"]) == ("auto", "all", 24)
    assert options["map"] == "question=instruction,answer=output"
    gsm = result["tasks"]["gsm8k"]
    assert (gsm["prompt_style"], gsm["max_new_tokens"], gsm["temperature"]) == ("chat", 3, 0.9)
    loss = result["tasks"][f"loss:{data}"]
    assert loss["policy"] == "all" and loss["max_len"] == 24 and loss["template"] not in ("", "auto")
    assert loss["map"] == {"instruction": "question", "output": "answer"}


def test_max_len_drops_and_truncations_are_reported_and_policy_all_keeps_prompts(tmp_path, tiny_dir, capsys):
    """An example whose response --max-len cut off was dropped without a word, under --policy all too."""
    from deltatune.cli import main

    data, out = _loss_file(tmp_path), tmp_path / "r.json"
    common = ["--model", str(tiny_dir), "--task", f"loss:{data}", "--map", "question=instruction,answer=output"]
    common += ["--max-len", "24", "--out", str(out), "--overwrite"]
    code, stdout, err = _eval(main, capsys, *common)
    assert code == 0 and f"| loss:{data} | 2 |" in stdout
    assert "0 of 3 examples truncated to --max-len 24 tokens, 1 dropped" in err
    assert json.loads(out.read_text())["tasks"][f"loss:{data}"]["dropped"] == 1
    code, stdout, err = _eval(main, capsys, *common, "--policy", "all")
    assert code == 0 and f"| loss:{data} | 3 |" in stdout  # its prompt tokens bear loss under --policy all
    assert "1 of 3 examples truncated to --max-len 24 tokens, 0 dropped" in err
    info = json.loads(out.read_text())["tasks"][f"loss:{data}"]
    assert (info["read"], info["truncated"], info["dropped"]) == (3, 1, 0)


# --- 8. an option the model's context cannot hold ----------------------------------------------


def _mmlu_root(tmp_path: Path, bad_option: str) -> Path:
    root = tmp_path / "data"
    (root / "mmlu").mkdir(parents=True)
    (root / "mmlu" / "aa_test.csv").write_text("What is 1+1?,1,2,3,4,B\n")
    (root / "mmlu" / "bb_test.csv").write_text(f'What is 2+2?,1,2,3,4,D\nWhich?,x,y,z,"{bad_option}",A\n')
    return root


@pytest.mark.parametrize("bad_option, says", [(" ".join(["word"] * 700), "does not fit"), ("", "no tokens")])
def test_an_option_that_cannot_be_scored_is_one_line_before_any_task_runs(
    tmp_path, tiny_dir, capsys, monkeypatch, bad_option, says
):
    from deltatune.cli import main
    from deltatune.evaluate import runner

    calls = []
    monkeypatch.setattr(runner, "score_options", lambda *a, **k: calls.append(1))
    root = _mmlu_root(tmp_path, bad_option)
    code, _, err = _eval(main, capsys, "--model", str(tiny_dir), "--task", "mmlu:aa,mmlu:bb", "--data-root", str(root))
    assert code == 2
    line = [ln for ln in err.splitlines() if "error" in ln]
    assert len(line) == 1 and f"{root / 'mmlu' / 'bb_test.csv'}:2: option D" in line[0] and says in line[0]
    assert calls == []  # found before mmlu:aa ran


def test_the_fit_check_renders_only_the_questions_of_options_near_the_limit(tmp_path, tiny_lm, tiny_tok, monkeypatch):
    """The check rendered every question (shots and chat template included) and scoring rendered them all again;
    now a question is rendered for the check only when one of its options needs the exact split."""
    from deltatune.errors import UserError
    from deltatune.evaluate import runner
    from deltatune.evaluate.tasks import load_items, resolve_task

    rendered = []
    real_render = runner.render
    monkeypatch.setattr(runner, "render", lambda *a, **k: rendered.append(a[3]) or real_render(*a, **k))
    fine = resolve_task("mmlu:bb", _mmlu_root(tmp_path / "fine", "w"))
    for mode in ("option", "letter"):
        options = runner.EvalOptions(progress=False, shots=1, choice_mode=mode)
        runner.check_choice_fits(tiny_lm, tiny_tok, fine, load_items(fine), options)
    assert rendered == []
    long = resolve_task("mmlu:bb", _mmlu_root(tmp_path / "long", " ".join(["word"] * 700)))
    with pytest.raises(UserError, match=r"bb_test\.csv:2: option D has \d+ tokens"):
        runner.check_choice_fits(tiny_lm, tiny_tok, long, load_items(long), runner.EvalOptions(progress=False))
    assert rendered == ["Which?"]  # the second item's question alone


def test_score_options_error_names_the_item_when_scoring_directly(tmp_path, tiny_dir, tiny_lm, tiny_tok):
    """evaluate_task (the API, forgetting) turns the scorer's error into the same one-line UserError."""
    from deltatune.errors import UserError
    from deltatune.evaluate.runner import EvalOptions, evaluate_task
    from deltatune.evaluate.tasks import resolve_task

    root = _mmlu_root(tmp_path, " ".join(["word"] * 700))
    task = resolve_task("mmlu:bb", root)
    with pytest.raises(UserError, match=r"bb_test\.csv:2: option D has \d+ tokens"):
        evaluate_task(tiny_lm, tiny_tok, task, EvalOptions(progress=False))


# --- 10. guard routes beyond open() and a forged pass status -----------------------------------


@pytest.mark.parametrize(
    "code",
    [
        "import io\nio.FileIO({path!r}, 'w').close()",
        "import os\nos.makedirs({path!r})",
        "import pathlib\npathlib.Path({path!r}).mkdir()",
        "import sqlite3\nsqlite3.connect({path!r}).close()",
    ],
)
def test_other_write_routes_outside_the_folder_are_refused(tmp_path, code):
    target = tmp_path / "outside"
    out = run_program(code.format(path=str(target)), FAST)
    assert not out.passed and "refused" in out.status
    assert not target.exists()


def test_the_same_routes_inside_the_folder_work():
    code = (
        "import io, os, sqlite3, pathlib\n"
        "io.FileIO('f', 'w').close()\nos.makedirs('a/b')\npathlib.Path('c').mkdir()\n"
        "sqlite3.connect('x.db').close()\nsqlite3.connect(':memory:').close()\n"
    )
    out = run_program(code, FAST)
    assert out.passed, out.status


@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(97)", "import os\nos._exit(97)", "exit(97)"])
def test_exiting_with_the_pass_status_is_not_a_pass(exit_call):
    from deltatune.evaluate.execution import PASS_STATUS

    assert str(PASS_STATUS) in exit_call
    out = run_program(ADD.program("    return a + b\n\n" + exit_call + "\n"), FAST)
    assert not out.passed and "before the end" in out.status


def test_docs_table_lists_the_new_routes():
    text = (REPO / "docs" / "evaluation.md").read_text()
    row = next(ln for ln in text.splitlines() if ln.startswith("| files |"))
    for route in ("io.FileIO", "os.makedirs", "sqlite3.connect"):
        assert route in row, route


# --- 11. chat-style option likelihood and lm-eval's trailing whitespace -------------------------


def test_trailing_whitespace_difference_is_documented():
    from deltatune.evaluate import choice

    assert "_encode_pair" in choice.__doc__ and "trailing whitespace" in choice.__doc__
    text = (REPO / "docs" / "evaluation.md").read_text()
    assert "_encode_pair" in text and "trailing whitespace" in text


def test_bbh_a_first_line_that_gives_one_option_wins_over_the_explanation_after_it():
    """The strict rules scored "Answer: (C)" or "(C) Paris" followed by an explanation naming other options as no
    answer (the shots' direct format), and still credited "B is correct. (A) is wrong" with (A)."""
    from deltatune.evaluate.extract import extract_bbh

    assert extract_bbh("Answer: (C)\nBecause (A) and (B) are wrong.", "(C)") == "(C)"
    assert extract_bbh("(C) Paris\nThe others: (A) Rome, (B) Oslo", "(C)") == "(C)"
    assert extract_bbh("B is correct. (A) is wrong", "(A)") != "(A)"
    assert extract_bbh("(A) or (C)", "(A)") != "(A)"


def test_a_task_given_twice_is_one_line(tmp_path, tiny_dir, capsys):
    """The table printed two rows while results.json kept one entry (keyed by name)."""
    from deltatune.cli import main

    root = _mmlu_root(tmp_path, "w")
    code = main(["eval", "--model", str(tiny_dir), "--task", "mmlu:aa,mmlu:aa", "--data-root", str(root)])
    assert code == 2 and "field 'task': task 'mmlu:aa' is given twice" in capsys.readouterr().err


def test_a_context_past_the_window_keeps_as_many_tokens_as_lm_eval():
    """lm-eval feeds (context + option)[-(max_length + 1):][:-1]: the option's last token is a target only. deltatune
    fed the last max_length tokens, spending a position on it, so a context past the window lost one token more
    and its option log-likelihoods were 0.07-0.5 nats off lm-eval's."""
    import torch

    from deltatune.evaluate.choice import score_options
    from deltatune.testing import tiny_model, tiny_tokenizer

    tok, model = tiny_tokenizer(), tiny_model(max_position_embeddings=32).double().eval()
    context, options = " ".join(["the cat sat on the mat"] * 6) + " and then", [" it slept", " a dog ran in"]
    scores = score_options(model, tok, [context], [options], max_length=32, progress=False)[0]
    c_ids = tok(context, add_special_tokens=False)["input_ids"]
    assert len(c_ids) > 32
    for option, score in zip(options, scores):
        o_ids = tok(option, add_special_tokens=False)["input_ids"]
        whole = (c_ids + o_ids)[-33:]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([whole[:-1]])).logits[0], dim=-1)
        start = len(whole) - len(o_ids)
        expected = sum(logp[t - 1, whole[t]].item() for t in range(start, len(whole)))
        assert score.logprob == pytest.approx(expected, abs=1e-9)
