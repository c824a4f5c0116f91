"""Review 9 of evaluation: GSM8K scored exactly as lm-eval's gsm8k task scores it. Each test failed before its fix."""

from __future__ import annotations

import json

import pytest

from deltatune.evaluate.extract import extract_gsm8k, gsm8k_target


def _variants(n: str) -> list[str]:
    return [
        f"#### {n}",
        f"#### {n}.0",  # deltatune read 18.0 as 18; lm-eval compares the text
        f"The answer is {n}...",  # its flexible regex takes the run of dots last
        f"so {n} - 4 = {n}, wait... hmm",
        f"The answer is ${n}.00.",
        f"#### {n}\n\n...",
        f"#### -{n}",
        f"####{n}",
        f"She has:\n- {n}",
        f"#### {n},000",
        "e.g., 12",
        "",
    ]


def test_gsm8k_scores_equal_hand_worked_lm_eval_ones(shared_data):
    # what lm-eval 0.4.13's filters and exact_match give, worked by hand from gsm8k.yaml
    answer = next(json.loads(line)["answer"] for line in open(shared_data / "gsm8k" / "test.jsonl"))
    assert answer.endswith("#### 18") and gsm8k_target(answer) == "18"
    scored = {v: (extract_gsm8k(v, True) == "18", extract_gsm8k(v, False) == "18") for v in _variants("18")}
    assert scored == {
        "#### 18": (True, True),
        "#### 18.0": (False, False),
        "The answer is 18...": (False, False),
        "so 18 - 4 = 18, wait... hmm": (False, False),
        "The answer is $18.00.": (False, False),
        "#### 18\n\n...": (True, False),
        "#### -18": (False, False),
        "####18": (False, True),
        "She has:\n- 18": (False, True),
        "#### 18,000": (False, False),
        "e.g., 12": (False, False),
        "": (False, False),
    }


def test_gsm8k_agrees_with_lm_evals_own_filters_on_real_answers(shared_data):
    lm_eval = pytest.importorskip("lm_eval")  # the dev extra: benchmarks/lm_eval_agreement.py
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    assert lm_eval.__version__.startswith("0.4.")
    ignored = [",", "\\$", "(?s).*#### ", "\\.$"]  # gsm8k.yaml's regexes_to_ignore, with ignore_case
    strict = RegexFilter(regex_pattern="#### (\\-?[0-9\\.\\,]+)")
    flexible = RegexFilter(regex_pattern="(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)
    lines = (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:100]
    for answer in (json.loads(line)["answer"] for line in lines):
        for text in _variants(answer.split("#### ")[-1]):
            for rule, is_strict in ((strict, True), (flexible, False)):
                picked = rule.apply([[text]], [None])[0][0]
                theirs = exact_match_hf_evaluate([picked], [answer], regexes_to_ignore=ignored, ignore_case=True)
                ours = extract_gsm8k(text, strict=is_strict) == gsm8k_target(answer)
                assert ours == bool(theirs["exact_match"]), (text, is_strict, picked)


def test_humaneval_stops_are_lm_evals_strings_as_written():
    # "\nclass ", "\ndef ", "\nprint(" let a top-level `default = 1` or `printer = ...` through, which lm-eval cuts
    from deltatune.evaluate.code import HUMANEVAL_STOP

    assert {"\nclass", "\ndef", "\n#", "\nif", "\nprint"} <= set(HUMANEVAL_STOP)  # lm-eval's humaneval.yaml `until`
    text = "    return a + b\ndefault = 3\nprint(add(1, 2))\n"
    cut = min(text.find(s) for s in HUMANEVAL_STOP if s in text)
    assert text[:cut] == "    return a + b"


@pytest.mark.parametrize("context, option", [("Answer:", " 5"), ("Question: Is it?\nAnswer:", " yes"), ("A:", " B)")])
def test_options_are_encoded_as_lm_eval_encodes_a_clean_pair(tiny_tok, context, option):
    # where the context's tokens start the joint encoding, deltatune's split is lm-eval's _encode_pair exactly
    from deltatune.evaluate.choice import split_encode

    def enc(text):
        return tiny_tok(text, add_special_tokens=False)["input_ids"]

    ctx, cont = split_encode(tiny_tok, context, option)
    assert ctx + cont == enc(context + option)
    lm_eval_model = pytest.importorskip("lm_eval.api.model")

    class Causal:
        backend = "causal"

        def tok_encode(self, text):
            return enc(text)

    assert lm_eval_model.TemplateLM._encode_pair(Causal(), context, option) == (ctx, cont)


def test_an_empty_option_is_refused_after_a_context_ending_in_a_space(tiny_tok):
    from deltatune.evaluate.choice import OptionError, score_options
    from deltatune.testing import tiny_model

    with pytest.raises(OptionError, match="encodes to no tokens of its own"):
        score_options(tiny_model(), tiny_tok, ["Answer: "], [["", "B"]], progress=False)
