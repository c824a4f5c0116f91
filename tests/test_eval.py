"""Evaluation: extraction, metrics, multiple choice by hand, batched generation, loss, tasks, CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from deltatune.evaluate import metrics as M
from deltatune.evaluate.choice import OptionScore, choice_accuracies, predict, score_options, split_encode
from deltatune.evaluate.extract import bbh_target, extract_bbh, extract_gsm8k, extract_letter, normalize_number
from deltatune.evaluate.generate import GenerationConfig, generate
from deltatune.evaluate.prompts import pick_shots, render
from deltatune.evaluate.tasks import Item, load_items, resolve_task

# --- extraction -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, strict, flexible",
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", "18", "18"),
        ("#### 1,000", "1000", "1000"),
        ("so the total is $1,234.00\n#### $1,234.00", None, "1234.00"),  # lm-eval's strict regex: no "$"
        ("#### 18.0", "18.0", "18.0"),  # lm-eval compares the text: not 18
        ("#### -3", "-3", "-3"),
        ("#### 0.50", "0.50", "0.50"),
        ("#### 5\n\n...", "5", ".."),  # its flexible regex takes a run of dots as the last "number"
        ("The answer is $390.00.", None, "390.00"),
        ("The answer is 42.", None, "42"),
        ("I think 3 apples, then 5 pears, so 8.", None, "8"),
        ("No number here", None, None),
        ("####  7", None, "7"),  # lm-eval's strict regex: "#### " then the number
    ],
)
def test_gsm8k_extraction_table(text, strict, flexible):
    assert extract_gsm8k(text, strict=True) == strict
    assert extract_gsm8k(text, strict=False) == flexible


@pytest.mark.parametrize(
    "raw, norm", [("$1,000", "1000"), ("18.0", "18"), ("7.", "7"), ("-0.50", "-0.5"), ("abc", None), ("3.25", "3.25")]
)
def test_normalize_number(raw, norm):
    assert normalize_number(raw) == norm


@pytest.mark.parametrize(
    "output, target, expected_match",
    [
        ("(B)", "(B)", True),
        ("B", "(B)", True),
        ("B) The specialist had a skin condition", "(B)", True),
        ("Let's think. So the answer is (C).", "(C)", True),
        ("the answer is A.", "(B)", False),
        ("True", "True", True),
        ("true.", "True", True),
        ("No\nBecause the steps return.", "No", True),
        ("Yes", "No", False),
        ("So the answer is invalid.", "invalid", True),
        ("24", "24", True),
        ("24.0", "24", True),
        ("] ]", "] ]", True),
        ("syndrome therefrom", "syndrome therefrom", True),
        ("therefrom syndrome", "syndrome therefrom", False),
    ],
)
def test_bbh_extraction_table(output, target, expected_match):
    assert (extract_bbh(output, bbh_target(target)) == bbh_target(target)) is expected_match


def test_extract_letter():
    assert extract_letter("B", 4) == "B"
    assert extract_letter("The answer is (C)", 4) == "C"
    assert extract_letter("E", 4) is None


# --- metrics ----------------------------------------------------------------------------------


def test_token_f1_hand_example():
    # pred tokens: cat sat on mat (articles dropped); ref: cat is on mat -> common 3, P=3/4, R=3/4
    assert M.token_f1("The cat sat on the mat.", "a cat is on the mat") == pytest.approx(0.75)
    assert M.token_f1("", "") == 1.0
    assert M.token_f1("x", "") == 0.0


def test_rouge_l_hand_example():
    # LCS("the cat sat on the mat", "the cat lay on the mat") = 5 tokens; P = R = 5/6
    assert M.rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    assert M.rouge_l("completely different", "nothing shared here") == 0.0


# --- multiple choice, computed by hand --------------------------------------------------------


def test_multiple_choice_matches_float64_hand_computation(tiny_lm, tiny_tok):
    model = tiny_lm.double()
    context, options = "What is 2 + 3? The answer is", [" 5", " 72", " fox jumps"]
    scores = score_options(model, tiny_tok, [context, context], [options, options[:2]], batch_size=4, progress=False)
    for o, text in enumerate(options):
        c_ids = tiny_tok(context, add_special_tokens=False)["input_ids"]
        whole = tiny_tok(context + text, add_special_tokens=False)["input_ids"]
        assert whole[: len(c_ids)] == c_ids
        o_ids = whole[len(c_ids) :]
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits[0].double()
        # log P(o_ids[j] | prefix) = logits[p] - logsumexp(logits[p]) at position p = len(c)+j-1
        expected = sum(
            float(logits[len(c_ids) + j - 1, t] - torch.logsumexp(logits[len(c_ids) + j - 1], 0))
            for j, t in enumerate(o_ids)
        )
        got = scores[0][o]
        assert got.logprob == pytest.approx(expected, abs=1e-9)
        assert got.n_tokens == len(o_ids) and got.n_chars == len(text.strip())
        if o < 2:  # the same pair in another question and another padded row gives the same number
            assert scores[1][o].logprob == pytest.approx(expected, abs=1e-9)


def _option_logprob_one_at_a_time(model, tok, context: str, option: str) -> float:
    c_ids, o_ids = split_encode(tok, context, option)
    with torch.no_grad():
        logits = model(torch.tensor([c_ids + o_ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[len(c_ids) + j - 1, t]) for j, t in enumerate(o_ids))


@pytest.mark.parametrize("method", [None, "prompt"])
def test_multiple_choice_rows_of_different_lengths_score_as_one_at_a_time(tiny_tok, method):
    # one batch holds contexts of 3 to 14 tokens: the LM head runs at the union of their option positions
    # (logits_to_keep), and every row must still read its own positions; prompt tuning adds virtual
    # positions that the decoder hook removes before the head
    from deltatune.methods.base import MethodSpec, get_method
    from deltatune.methods.inject import freeze
    from deltatune.testing import tiny_model

    model = tiny_model().double()
    if method:
        freeze(model)
        get_method(method)(MethodSpec(name=method, options={"num_virtual_tokens": 3})).apply(model)
        torch.nn.init.normal_(next(p for p in model.parameters() if p.requires_grad), std=0.5)
    contexts = ["Q: 2 + 3? A:", "A long question about nothing in particular, to make the row wide? A:", "Hi"]
    options = [[" 5", " seventy two"], [" yes", " no", " maybe so"], [" there", "!"]]
    scores = score_options(model, tiny_tok, contexts, options, batch_size=8, progress=False)
    every = score_options(model, tiny_tok, contexts, options, batch_size=8, progress=False, all_logits=True)
    for q, (context, opts) in enumerate(zip(contexts, options)):
        for o, text in enumerate(opts):
            expected = _option_logprob_one_at_a_time(model, tiny_tok, context, text)
            assert scores[q][o].logprob == pytest.approx(expected, abs=1e-9), (q, o)
            assert every[q][o].logprob == pytest.approx(expected, abs=1e-9), (q, o)


def test_options_over_a_shared_context_score_as_whole_rows_in_float64(tiny_tok, monkeypatch):
    """The shared-context path (each context once, its options over its cache) against whole (context, option)
    rows, on a model with a trained-looking LoRA: one-token and many-token options, questions of 2 to 4
    options, more questions than a batch (several batches, several option groups), float64 to 1e-9."""
    from deltatune.evaluate import choice
    from deltatune.evaluate.choice import can_share_context
    from deltatune.methods.base import MethodSpec, get_method
    from deltatune.methods.inject import freeze
    from deltatune.testing import tiny_model

    model = tiny_model().double()
    freeze(model)
    get_method("lora")(MethodSpec(name="lora", rank=2, alpha=4, targets="all-linear")).apply(model)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.3)
    assert can_share_context(model)
    contexts = ["Q: 2 + 3? A:", "A long question about nothing in particular, to make the row wide? A:", "Hi", "x"]
    options = [[" 5", " seventy two", "!"], [" yes", " no", " maybe so, or maybe not at all"], ["?", "!"]]
    options.append([" a", " b c", " d e f", "."])
    took = []
    real = choice._score_over_shared_contexts
    monkeypatch.setattr(choice, "_score_over_shared_contexts", lambda *a: took.append(1) or real(*a))
    shared = score_options(model, tiny_tok, contexts, options, batch_size=3, progress=False)
    assert took == [1]  # the default took the shared-context path
    rows = score_options(model, tiny_tok, contexts, options, batch_size=3, progress=False, shared_context=False)
    assert took == [1]
    for q, (context, opts) in enumerate(zip(contexts, options)):
        for o, text in enumerate(opts):
            expected = _option_logprob_one_at_a_time(model, tiny_tok, context, text)
            assert shared[q][o].logprob == pytest.approx(expected, abs=1e-9), (q, o)
            assert rows[q][o].logprob == pytest.approx(expected, abs=1e-9), (q, o)
            assert shared[q][o].n_tokens == rows[q][o].n_tokens and shared[q][o].n_chars == rows[q][o].n_chars


def test_a_model_that_returns_no_cache_scores_options_as_whole_rows(tiny_tok):
    """Gradient checkpointing in train mode turns transformers' cache off: scoring falls back to whole rows."""
    from deltatune.testing import tiny_model

    model = tiny_model().double()
    contexts, options = ["Q: 2 + 3? A:", "Hi"], [[" 5", " seventy two"], [" there", "!"]]
    expected = score_options(model, tiny_tok, contexts, options, progress=False, shared_context=False)
    from deltatune.train.loop import enable_activation_checkpointing

    enable_activation_checkpointing(model)
    model.train()
    got = score_options(model, tiny_tok, contexts, options, progress=False)
    for q in range(2):
        for o in range(2):
            assert got[q][o].logprob == pytest.approx(expected[q][o].logprob, abs=1e-9)


def test_an_empty_context_is_refused(tiny_lm, tiny_tok):
    with pytest.raises(ValueError, match="context of question 0"):
        score_options(tiny_lm, tiny_tok, [""], [[" a", " b"]], progress=False)


def test_virtual_token_models_score_options_as_whole_rows(tiny_tok):
    from deltatune.evaluate.choice import can_share_context
    from deltatune.methods.base import MethodSpec, get_method
    from deltatune.methods.inject import freeze
    from deltatune.testing import tiny_model

    model = tiny_model()
    assert can_share_context(model)
    freeze(model)
    get_method("prompt")(MethodSpec(name="prompt", options={"num_virtual_tokens": 3})).apply(model)
    assert not can_share_context(model)  # the virtual positions stand before every row, cache or not


def test_normalisations_choose_differently():
    # a long likely-per-char option against a short one: raw sum picks short, per-char picks long
    short, long_ = OptionScore(-3.0, 1, 2), OptionScore(-8.0, 4, 20)
    assert predict([short, long_], "sum") == 0
    assert predict([short, long_], "char") == 1  # -0.4/char beats -1.5/char
    assert predict([short, long_], "token") == 1  # -2.0/token beats -3.0/token
    accs = choice_accuracies([[short, long_], [short, long_]], [1, 0])
    assert accs == {"acc": 0.5, "acc_token": 0.5, "acc_sum": 0.5}


def test_split_encode_concatenation_is_whole(tiny_tok):
    ctx, opt = split_encode(tiny_tok, "Answer:", " 5")
    assert ctx + opt == tiny_tok("Answer: 5", add_special_tokens=False)["input_ids"]


# --- generation -------------------------------------------------------------------------------


def test_batched_left_padded_greedy_equals_one_by_one(tiny_lm, tiny_tok):
    prompts = ["What is 2 + 3?", "The quick brown fox jumps over the lazy dog and", "Natalia"]
    cfg = GenerationConfig(max_new_tokens=6)
    batched = generate(tiny_lm, tiny_tok, prompts, cfg, batch_size=3, progress=False)
    single = [generate(tiny_lm, tiny_tok, [p], cfg, batch_size=1, progress=False)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(t, str) for t in batched)


def test_greedy_generation_equals_transformers_own_generate(tiny_lm, tiny_tok):
    """The LM head at the last position chosen by index (not generate's own slice `1`) gives the same tokens as
    transformers' generate left to itself, on a left-padded batch."""
    prompts = ["What is 2 + 3?", "The quick brown fox jumps over the lazy dog and", "Natalia"]
    ours = generate(tiny_lm, tiny_tok, prompts, GenerationConfig(max_new_tokens=7), batch_size=3, progress=False)
    for prompt, text in zip(prompts, ours):
        ids = torch.tensor([tiny_tok(prompt, add_special_tokens=False)["input_ids"]])
        out = tiny_lm.generate(input_ids=ids, max_new_tokens=7, do_sample=False, pad_token_id=0)
        assert text == tiny_tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_sampling_is_seeded(tiny_lm, tiny_tok):
    prompts = ["The quick", "What is"]
    cfg = GenerationConfig(max_new_tokens=5, do_sample=True, temperature=1.5, seed=3)
    a = generate(tiny_lm, tiny_tok, prompts, cfg, progress=False)
    b = generate(tiny_lm, tiny_tok, prompts, cfg, progress=False)
    assert a == b
    # and it really samples: greedy text (what a run ignoring do_sample would give twice) and another seed differ
    greedy = generate(tiny_lm, tiny_tok, prompts, GenerationConfig(max_new_tokens=5), progress=False)
    other = generate(tiny_lm, tiny_tok, prompts, dataclasses.replace(cfg, seed=4), progress=False)
    assert a != greedy and a != other


def test_generation_stops_at_stop_string(tiny_lm, tiny_tok):
    full = generate(tiny_lm, tiny_tok, ["The quick"], GenerationConfig(max_new_tokens=8), progress=False)[0]
    if len(full) > 2:
        cut = generate(
            tiny_lm, tiny_tok, ["The quick"], GenerationConfig(max_new_tokens=8, stop=(full[2:4],)), progress=False
        )[0]
        assert cut == full[: full.find(full[2:4])]


# --- held-out loss ----------------------------------------------------------------------------


@pytest.mark.parametrize("flat", [False, True])
def test_heldout_loss_is_token_weighted(tiny_lm, tiny_tok, flat):
    """Padded rows or one unpadded row: the same hand-computed mean over tokens. The first token's weight
    counts for nothing either way (nothing precedes it; in a flat row the previous example would)."""
    from deltatune.data.segments import Role, TokenizedExample
    from deltatune.evaluate.loss import heldout_loss

    model = tiny_lm.double()
    a = [5, 9, 17, 33, 2]
    b = [7, 8, 2]
    exs = [
        TokenizedExample(a, [Role.INSTRUCTION] * 5, [0] * 5, weights=[0, 0, 1, 1, 1]),
        TokenizedExample(b, [Role.INSTRUCTION] * 3, [0] * 3, weights=[1, 0, 1]),
    ]
    res = heldout_loss(model, exs, batch_size=2, pad_id=2, progress=False, flat=flat)
    nll = []
    for ids, w in ((a, [0, 0, 1, 1, 1]), (b, [0, 0, 1])):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        nll += [-float(lp[t - 1, ids[t]]) for t in range(1, len(ids)) if w[t]]
    assert res.tokens == 4 and res.examples == 2
    assert res.loss == pytest.approx(sum(nll) / 4, abs=1e-9)  # a mean over tokens, not over examples
    assert res.perplexity == pytest.approx(math.exp(sum(nll) / 4))


def _examples_of_many_lengths(n: int = 11):
    from deltatune.data.segments import Role, TokenizedExample

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        k = 3 + 7 * i % 41
        ids = torch.randint(3, 200, (k,), generator=g).tolist()
        weights = [0.0] * (k // 2) + [1.0] * (k - k // 2)
        out.append(TokenizedExample(ids, [Role.INSTRUCTION] * k, [0] * k, weights=weights))
    return out


def test_flat_rows_are_the_cpu_default_and_equal_padded_batches(tiny_lm):
    """On CPU a transformers model scores batches as unpadded rows (auto), equal to padded batches to
    float32 rounding, and leaves with the attention implementation it came with."""
    from deltatune.evaluate.loss import heldout_loss

    exs = _examples_of_many_lengths()
    before = tiny_lm.config._attn_implementation
    padded = heldout_loss(tiny_lm, exs, batch_size=4, progress=False, flat=False)
    calls = []
    hook = tiny_lm.get_decoder().register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    auto = heldout_loss(tiny_lm, exs, batch_size=4, progress=False)
    hook.remove()
    assert [kw["input_ids"].shape[0] for kw in calls] == [1, 1, 1] and all("packed_spans" in kw for kw in calls)
    assert auto.tokens == padded.tokens and auto.loss == pytest.approx(padded.loss, rel=1e-5)
    assert tiny_lm.config._attn_implementation == before


def test_virtual_tokens_keep_padded_batches(tiny_lm):
    """Prompt tuning gives every sequence its own virtual positions: auto stays on padded batches (the same
    number as forced padding) and asking for flat rows is refused."""
    from deltatune.evaluate.loss import heldout_loss
    from deltatune.methods.base import MethodSpec, get_method

    get_method("prompt")(MethodSpec(name="prompt", options={"num_virtual_tokens": 3})).apply(tiny_lm)
    exs = _examples_of_many_lengths(5)
    auto = heldout_loss(tiny_lm, exs, batch_size=4, progress=False)
    assert auto.loss == heldout_loss(tiny_lm, exs, batch_size=4, progress=False, flat=False).loss
    with pytest.raises(ValueError, match="virtual tokens"):
        heldout_loss(tiny_lm, exs, batch_size=4, progress=False, flat=True)


# --- prompts and few-shot ---------------------------------------------------------------------


def test_pick_shots_seeded_and_never_the_item():
    pool = [Item(f"q{i}", str(i), str(i)) for i in range(10)]
    a = pick_shots(pool, 3, seed=1)
    assert a == pick_shots(pool, 3, seed=1) and len({id(x) for x in a}) == 3
    for item in pool:
        shots = pick_shots(pool, 3, seed=1, exclude=item)
        assert item not in shots and len(shots) == 3


def test_render_plain_and_chat(tiny_tok):
    assert render(tiny_tok, "plain", [("1+1?", "2")], "2+2?") == "Question: 1+1?\nAnswer: 2\n\nQuestion: 2+2?\nAnswer:"
    chat = render(tiny_tok, "chat", [("1+1?", "2")], "2+2?")
    assert chat == (
        "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )


# --- real data files through the shared_data fixture ------------------------------------------


def test_reads_gsm8k_mmlu_bbh(shared_data):
    g = load_items(resolve_task("gsm8k", shared_data), limit=2)
    assert g[0].target == "18" and g[0].shot_answer.endswith("#### 18")
    mm = load_items(resolve_task("mmlu:anatomy", shared_data))
    assert len(mm) == 135 and mm[2].options == ["Bladder", "Kidney", "Ureter", "Urethra"] and mm[2].answer == 0
    assert all(len(i.options) == 4 for i in mm)
    b = load_items(resolve_task("bbh:date_understanding", shared_data), limit=1)
    assert b[0].target == "(B)" and "Options:" in b[0].prompt
    allb = resolve_task("bbh", shared_data)
    assert len(allb.files) == 27
    si = load_items(resolve_task("self-instruct", shared_data), limit=1)
    assert si[0].target.startswith("If you have any questions")


def test_missing_data_root_is_one_line_error(tmp_path, monkeypatch):
    from deltatune.errors import UserError

    monkeypatch.setenv("DELTATUNE_DATA", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="DELTATUNE_DATA"):
        resolve_task("gsm8k")


# --- the CLI, end to end on a tiny saved model ------------------------------------------------


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_lm, tiny_tok):
    folder = tmp_path / "tiny"
    tiny_lm.save_pretrained(folder)
    tiny_tok.save_pretrained(folder)
    return folder


def test_eval_cli_end_to_end(tmp_path, tiny_model_dir, capsys):
    from deltatune.cli import main

    data = tmp_path / "qa.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"q": q, "a": a}) for q, a in [("What is 2 + 3?", "5"), ("Say fox", "fox"), ("Say dog", "dog")]
        )
        + "\n"
    )
    out, preds = tmp_path / "res" / "r.json", tmp_path / "p.jsonl"
    args = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--task",
        f"file:{data}",
        "--map",
        "instruction=q,output=a",
        "--max-new-tokens",
        "4",
        "--shots",
        "1",
        "--out",
        str(out),
        "--predictions",
        str(preds),
        "--no-progress",
    ]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert f"| file:{data} | 3 | rouge_l |" in table
    res = json.loads(out.read_text())["tasks"][f"file:{data}"]
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert res["n"] == 3 and len(rows) == 3
    # the reported metrics are the means of the per-item numbers
    for key in ("exact_match", "f1", "rouge_l"):
        assert res["metrics"][key] == pytest.approx(sum(r[key] for r in rows) / 3)

    # a second run refuses to replace the results unless told to, and then replaces them whole
    again = [a for a in args if a != "--shots" and a != "1"]
    out.write_text("older results\n")
    assert main(again) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "older results\n"
    assert main([*again, "--overwrite"]) == 0
    assert json.loads(out.read_text())["tasks"][f"file:{data}"]["n"] == 3


def test_eval_cli_bad_input_exits_2(tmp_path, tiny_model_dir, capsys):
    from deltatune.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n')
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", str(tiny_model_dir), "--task", f"file:{bad}", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"deltatune eval: error: {bad}:2: field 'output': missing or not a string\n"
    assert not out.exists()
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "nosuch", "--no-progress"]) == 2


def test_loss_on_file_equals_the_training_loss(tmp_path, tiny_lm, tiny_tok):
    """Same template, policy and weighting as training: compare with collate + the trainer's reference loss."""
    from deltatune.data.masking import parse_policy
    from deltatune.data.packing import collate
    from deltatune.data.pipeline import prepare_dataset
    from deltatune.evaluate.loss import loss_on_file
    from deltatune.train.loss import reference_lm_loss_sum

    path = tmp_path / "held.jsonl"
    path.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"instruction": "What is 2 + 3?", "output": "The answer is 5."},
                {"instruction": "Name an animal", "input": "quick", "output": "fox"},
                {"instruction": "Natalia sold clips to 48 of her friends in April", "output": "#### 72"},
            ]
        )
    )
    model = tiny_lm.double()
    for policy in ("response", "all"):
        res = loss_on_file(model, tiny_tok, path, template="chatml", policy=policy, batch_size=2, progress=False)
        exs = prepare_dataset(path, tiny_tok, template="chatml").examples
        batch = collate(exs, parse_policy(policy), seq_len=1024, pad_id=tiny_tok.pad_token_id, packed=False)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total, weight = reference_lm_loss_sum(logits, batch["input_ids"], batch["loss_weights"])
        assert res.tokens == pytest.approx(float(weight))
        assert res.loss == pytest.approx(float(total / weight), abs=1e-9)
        assert res.examples == 3


def test_eval_cli_loss_task(tmp_path, tiny_model_dir, capsys):
    from deltatune.cli import main

    path = tmp_path / "held.jsonl"
    path.write_text('{"instruction": "What is 2 + 3?", "output": "The answer is 5."}\n')
    out = tmp_path / "r.json"
    assert (
        main(["eval", "--model", str(tiny_model_dir), "--task", f"loss:{path}", "--out", str(out), "--no-progress"])
        == 0
    )
    res = json.loads(out.read_text())["tasks"][f"loss:{path}"]
    assert res["metric"] == "loss" and res["metrics"]["perplexity"] == pytest.approx(math.exp(res["score"]))


def test_shots_come_from_the_same_subject_and_the_whole_file(shared_data):
    from deltatune.evaluate.runner import EvalOptions, _shots_for

    task = resolve_task("mmlu:anatomy+astronomy", shared_data)
    items = load_items(task, limit=1)  # one question per subject ...
    pool = load_items(task)  # ... shots still come from the whole subject file
    for item in items:
        shots = _shots_for(item, pool, EvalOptions(shots=3))
        assert len(shots) == 3 and all(s.group == item.group for s in shots)
        assert all(s.source != item.source for s in shots)
    g = resolve_task("gsm8k", shared_data)
    from deltatune.evaluate.tasks import load_shot_pool

    train = load_shot_pool(g)
    shots = _shots_for(load_items(g, limit=1)[0], train, EvalOptions(shots=2, seed=5))
    assert all("gsm8k/train.jsonl" in s.source for s in shots) and len(shots) == 2


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_eval_records_dtype_and_batch_and_warns_of_bf16_generation(tmp_path, tiny_model_dir, capsys, dtype):
    """Greedy texts in bf16 change with the batch size (docs/evaluation.md): the results record both, and a
    bf16 generation run says so; fp32 does not."""
    from deltatune.cli import main

    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"instruction": "Say fox", "output": "fox"}) + "\n")
    out = tmp_path / "r.json"
    args = ["eval", "--model", str(tiny_model_dir), "--task", f"file:{data}", "--max-new-tokens", "2"]
    assert main([*args, "--dtype", dtype, "--batch-size", "3", "--out", str(out), "--no-progress"]) == 0
    options = json.loads(out.read_text())["options"]
    assert (options["dtype"], options["batch_size"]) == (dtype, 3)
    assert ("greedy texts change with --batch-size" in capsys.readouterr().err) == (dtype == "bf16")


def test_an_option_longer_than_the_context_is_refused_not_scored_at_wrong_positions(tiny_lm, tiny_tok):
    """lm-eval asserts the continuation fits; here the truncated row would have scored the option's own tokens
    from positions before it (a negative context length). A clear error instead; options that fit still score."""
    words = " ".join(["seven"] * 40)
    n = len(tiny_tok(" " + words, add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match=f"has {n} tokens: it does not fit the model's context of {n}"):
        score_options(tiny_lm, tiny_tok, ["Q:"], [[" " + words, " no"]], max_length=n, progress=False)
    (scores,) = score_options(tiny_lm, tiny_tok, ["Q:"], [[" " + words, " no"]], max_length=n + 1, progress=False)
    assert len(scores) == 2
