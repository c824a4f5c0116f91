"""Evaluation review 3: defects a user would hit, each proven by a test (Alpaca stops, free-text exact match and
F1 against SQuAD's normalisation, numeric flags that are tracebacks, late option checks, BOS in `generate`)."""

from __future__ import annotations

import json
import re
import string
from collections import Counter

import pytest
import torch

from deltatune.evaluate import metrics as M
from deltatune.evaluate.prompts import ALPACA_HEADER
from deltatune.evaluate.runner import EvalOptions, _score_generation, evaluate_task
from deltatune.evaluate.tasks import Item, Task, resolve_task
from deltatune.testing import tiny_model, tiny_tokenizer

# --- Alpaca few-shot: the header before the next example is not part of the answer ------------------


def _scripted(model, tok, continuation: str):
    """`model.generate` that always continues with `continuation` (a base model repeating the shots' pattern)."""
    new = tok(continuation, add_special_tokens=False)["input_ids"]

    def fake_generate(input_ids, attention_mask=None, **kwargs):
        return torch.cat([input_ids, torch.tensor([new] * input_ids.shape[0])], dim=1)

    model.generate = fake_generate
    return model


def test_alpaca_shots_cut_the_answer_before_the_next_examples_header(tmp_path):
    # every Alpaca shot starts with the header "Below is an instruction ...", then "### Instruction:"; a model
    # that runs on into another example writes the header first. The stop was "### Instruction:" only, so the
    # header stayed in the answer: "Paris" scored exact match 0 and ROUGE-L 0.11 against "Paris".
    tok = tiny_tokenizer()
    model = _scripted(
        tiny_model(), tok, "Paris\n\n" + ALPACA_HEADER + "### Instruction:\nCapital of Peru?\n\n### Response:\nLima"
    )
    path = tmp_path / "capitals.jsonl"
    rows = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid")]
    path.write_text("".join(json.dumps({"instruction": f"Capital of {c}?", "output": o}) + "\n" for c, o in rows))
    opts = EvalOptions(style="alpaca", shots=1, limit=1, progress=False)
    res = evaluate_task(model, tok, resolve_task(f"file:{path}"), opts)
    assert res.predictions[0]["output"].strip() == "Paris"
    assert res.metrics["exact_match"] == 1.0 and res.metrics["rouge_l"] == 1.0


# --- free text: exact match and F1 after SQuAD's normalisation, as docs/evaluation.md says ------------


def _squad_normalize(s: str) -> str:
    """The official SQuAD v1.1 evaluation script's normalize_answer, verbatim in substance."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _squad_f1(prediction: str, truth: str) -> float:
    pred, ref = _squad_normalize(prediction).split(), _squad_normalize(truth).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


PAIRS = [
    ("The Eiffel Tower", "Eiffel Tower"),
    ("Paris, France", "Paris France"),
    ("1,000", "1000"),
    ("U.S.", "US"),
    ("don't stop", "dont stop"),
    ("The cat sat on the mat.", "a cat is on the mat"),
    ("yes.", "Yes"),
    ("red", "blue"),
]


@pytest.mark.parametrize(("prediction", "reference"), PAIRS)
def test_free_text_exact_match_and_f1_are_squads(prediction, reference):
    # exact match compared case and surrounding punctuation only ("The Eiffel Tower" vs "Eiffel Tower": F1 1.0,
    # exact match 0.0), and punctuation became a space ("1,000" vs "1000": F1 0.0, SQuAD's script says 1.0)
    task = Task("file:x", "generate", (), "instruction", "rouge_l", "text")
    row = _score_generation(task, Item("q", reference), prediction)
    squad_em = float(_squad_normalize(prediction) == _squad_normalize(reference))
    assert row["exact_match"] == squad_em
    assert row["f1"] == pytest.approx(_squad_f1(prediction, reference))
    assert M.token_f1(prediction, reference) == pytest.approx(_squad_f1(prediction, reference))


# --- numeric flags that the run cannot use are one line, before any model loads -----------------------


@pytest.mark.parametrize(
    "flags",
    [
        ["--sample", "--temperature", "0"],
        ["--sample", "--temperature", "nan"],
        ["--exec-timeout", "nan"],
        ["--exec-timeout", "inf"],
        ["--top-p", "nan"],
    ],
)
def test_numbers_a_run_cannot_use_are_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch, flags):
    # `--sample --temperature 0` was a ValueError traceback from transformers after the model loaded (and after
    # every earlier task ran); `--exec-timeout nan` / `inf` a ValueError / OverflowError from int() in the sandbox
    import deltatune.models as models
    from deltatune.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", no_model)
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n")
    rc = main(["eval", "--model", str(tmp_path), "--task", f"file:{data}", "--no-progress", *flags])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and flags[-2].lstrip("-") in err, err


def test_sampling_at_temperature_0_is_refused_by_the_api_not_by_transformers():
    from deltatune.errors import UserError
    from deltatune.evaluate.generate import GenerationConfig, generate

    with pytest.raises(UserError, match="temperature"):
        generate(tiny_model(), tiny_tokenizer(), ["hi"], GenerationConfig(do_sample=True, temperature=0.0))


# --- option mistakes are found before the model loads, not after the tasks before them ran -------------


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--policy", "nonsense"], "policy"),
        (["--template", "nonsense"], "template"),
        (["--shots", "5"], "shots"),
    ],
)
def test_option_mistakes_are_found_before_the_model_loads(tmp_path, capsys, monkeypatch, flags, field):
    # `--task file:X,loss:X --policy nonsense` loaded the model and ran file:X to the end (hours on a real
    # task), then failed on the loss task and wrote nothing; `--shots 5` with 2 examples failed the same way
    import deltatune.models as models
    from deltatune.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", no_model)
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}", "output": w}) + "\n" for w in ("hi", "yo")))
    out, model = tmp_path / "r.json", tmp_path / "model"
    model.mkdir()
    task = f"file:{data},loss:{data}"
    rc = main(["eval", "--model", str(model), "--task", task, "--out", str(out), "--no-progress", *flags])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and field in err, err
    assert not out.exists()


def test_forgetting_checks_options_before_the_base_model_loads(tmp_path, capsys, monkeypatch):
    import deltatune.models as models
    from deltatune.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", no_model)
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n")
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    args = ["forgetting", "--base", str(tmp_path), "--run", str(run), "--target", f"file:{data}"]
    args += ["--source", f"loss:{data}", "--out", str(tmp_path / "lf"), "--policy", "nonsense", "--no-progress"]
    assert main(args) == 2
    assert "policy" in capsys.readouterr().err


# --- `generate` without a chat template: the tokenizer's BOS, as --raw and eval's plain prompts -------


def test_generate_without_a_chat_template_gives_the_prompt_the_tokenizers_bos(tmp_path, capsys):
    # with no chat template the prompt becomes "user: ...\nassistant: " and was encoded without the BOS a
    # Llama-style base tokenizer adds (--raw adds it; a base model without a chat template is exactly the
    # model that needs it)
    from tokenizers import processors

    from deltatune.cli import main

    model, tok = tiny_model(0, initializer_range=0.2), tiny_tokenizer()
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    tok.bos_token = "<|endoftext|>"
    tok.chat_template = None
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ids = tok("user: The quick brown fox\nassistant: ", add_special_tokens=False)["input_ids"]
    answers = {}
    for name, prompt in (("with", [bos] + ids), ("without", ids)):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        answers[name] = tok.decode(out[0, len(prompt) :], skip_special_tokens=True).strip()
    assert answers["with"] != answers["without"]  # else the test could not tell them apart
    args = ["generate", "--model", str(tmp_path), "--prompt", "The quick brown fox", "--max-new-tokens", "6"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == answers["with"]


# --- HumanEval: a chat model's answer in a code fence is not cut at the "\ndef " inside the fence -------------

FENCED_ADD = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\n\ndef unrelated():\n    pass\n"


def test_a_fenced_humaneval_answer_is_scored_not_cut_to_its_opening_fence(tmp_path):
    """The stop strings ("\\ndef ", "\\n#", ...) cut the text at the fence's own "\\ndef add": "```python" alone,
    a SyntaxError, pass@1 0 for a right answer. Inside an open fence they no longer count; after it they do."""
    problem = {
        "task_id": "Toy/0",
        "prompt": 'def add(a, b):\n    """Return a + b."""\n',
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
        "entry_point": "add",
    }
    path = tmp_path / "he.jsonl"
    path.write_text(json.dumps(problem) + "\n")
    tok = tiny_tokenizer()
    model = _scripted(tiny_model(), tok, FENCED_ADD)
    opts = EvalOptions(progress=False, allow_code_execution=True, exec_timeout=5.0, max_new_tokens=64)
    res = evaluate_task(model, tok, resolve_task(f"code:{path}"), opts)
    assert res.metrics == {"pass@1": 1.0}
    assert res.predictions[0]["completions"] == ["\ndef add(a, b):\n    return a + b\n"]  # the fenced code, run


def test_the_stop_criterion_ignores_stop_strings_inside_an_open_fence():
    from deltatune.evaluate.generate import StopStringsCriterion, cut_at_stop

    tok = tiny_tokenizer()
    prompt = tok("def add(a, b):\n", add_special_tokens=False)["input_ids"]

    def stops(text: str, outside_fences: bool) -> bool:
        ids = torch.tensor([prompt + tok(text, add_special_tokens=False)["input_ids"]])
        return bool(StopStringsCriterion(tok, ("\ndef ",), len(prompt), outside_fences)(ids, None)[0])

    inside, after = "```python\ndef ", "```python\ndef f():\n    pass\n```\n\ndef "  # each step sees the newest text
    assert stops(inside, outside_fences=False) and not stops(inside, outside_fences=True)
    assert stops(after, outside_fences=True)
    assert cut_at_stop(after, ("\ndef ",), outside_fences=True) == "```python\ndef f():\n    pass\n```\n"


def test_temperature_without_sample_says_decoding_is_greedy(tmp_path, capsys, monkeypatch):
    """`--temperature 0.7` alone changed nothing (greedy); the run now says so instead of scoring quietly."""
    import argparse

    from deltatune.cli.eval import add_parser, options_from_args

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    base = ["eval", "--model", "m", "--task", "gsm8k"]
    options_from_args(parser.parse_args([*base, "--temperature", "0.7"]))
    assert "apply only with --sample; decoding is greedy" in capsys.readouterr().err
    options_from_args(parser.parse_args([*base, "--sample", "--temperature", "0.7"]))
    options_from_args(parser.parse_args(base))
    assert capsys.readouterr().err == ""


def test_shots_on_a_task_that_takes_none_is_said(tmp_path, capsys):
    """`--shots 3` on a loss: or code: task was silently ignored."""
    from deltatune.evaluate.runner import check_task_options

    data = tmp_path / "l.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n")
    task = resolve_task(f"loss:{data}")
    check_task_options(task, [], EvalOptions(shots=3, progress=False))
    assert "--shots does not apply to" in capsys.readouterr().err
    check_task_options(task, [], EvalOptions(shots=0, progress=False))
    assert capsys.readouterr().err == ""
