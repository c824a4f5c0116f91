"""The training template travels with the output: the tokenizer saved beside an adapter (and a merged or fully
finetuned model) carries it as its chat template, so inference renders the prompts training rendered."""

from __future__ import annotations

import json

import pytest
from tokenizers import processors

from deltatune.data.pipeline import prepare_records
from deltatune.data.segments import Role
from deltatune.data.templates import training_chat_template
from deltatune.testing import tiny_model, tiny_sentencepiece_tokenizer, tiny_tokenizer, tiny_train_config

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "The answer is 5."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Natalia sold 48 clips in April."},
        {"role": "assistant", "content": "72 clips"},
        {"role": "user", "content": "And in May?"},
        {"role": "assistant", "content": "24 clips"},
    ],
    # first texts that open with a space: a Metaspace tokenizer must then get no space after BOS
    [{"role": "user", "content": " What is 7?"}, {"role": "assistant", "content": " Seven."}],
    [
        {"role": "system", "content": " Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ],
]


def _with_bos(tok, bos: str):
    """The tokenizer putting `bos` in front of text, as Llama's do (the tiny ones add none)."""
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.convert_tokens_to_ids(bos))]
    )
    tok.bos_token = bos
    tok.chat_template = None
    return tok


TOKENIZERS = {
    "byte-level": lambda: tiny_tokenizer(),
    "byte-level, BOS": lambda: _with_bos(tiny_tokenizer(), "<|endoftext|>"),  # Llama 3's kind
    "metaspace, BOS": lambda: _with_bos(tiny_sentencepiece_tokenizer(), "<s>"),  # Llama 2's and Mistral's kind
    "byte-level, BOS <|im_start|>": lambda: _with_bos(tiny_tokenizer(), "<|im_start|>"),  # ChatML opens with it
}


# every template with every tokenizer, except ChatML where the vocabulary lacks its tokens (get_template refuses it)
CASES = [
    (t, k) for t in ("chatml", "alpaca", "raw") for k in TOKENIZERS if not (t == "chatml" and k == "metaspace, BOS")
]


def _answer_starts(ex) -> list[int]:
    """The index of each answer's first token."""
    return [
        i for i, r in enumerate(ex.roles) if r is Role.RESPONSE and (i == 0 or ex.roles[i - 1] is not Role.RESPONSE)
    ]


@pytest.mark.parametrize("template,kind", CASES)
def test_the_saved_chat_template_renders_every_prompt_training_rendered(kind, template):
    # every answer's prompt (the conversation before it, with the generation prompt) tokenizes to exactly the
    # tokens training put before that answer, BOS included; the whole conversation to the whole example
    tok = TOKENIZERS[kind]()
    tok.chat_template = None  # a base model's tokenizer
    jinja, warning = training_chat_template(template, tok)
    assert jinja is not None and warning == ""
    examples = prepare_records([{"messages": c} for c in CONVERSATIONS], tok, template=template, max_len=512).examples
    for conv, ex in zip(CONVERSATIONS, examples):
        answers = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
        for k, start in zip(answers, _answer_starts(ex), strict=True):
            prompt = tok.apply_chat_template(conv[:k], chat_template=jinja, tokenize=False, add_generation_prompt=True)
            assert tok(prompt, add_special_tokens=False)["input_ids"] == ex.input_ids[:start]
        whole = tok.apply_chat_template(conv, chat_template=jinja, tokenize=False)
        assert tok(whole, add_special_tokens=False)["input_ids"] == ex.input_ids


@pytest.mark.parametrize("template,kind", CASES)
def test_auto_on_a_carried_template_is_the_template_trained(kind, template):
    # `auto` on the saved tokenizer segmented the Jinja rendering (`tokenizer`): Alpaca's preamble tagged `role`
    # (the instruction policy's loss over other tokens) and its input section gone; now the same tokens and roles
    tok = TOKENIZERS[kind]()
    tok.chat_template = None
    saved = TOKENIZERS[kind]()
    saved.chat_template = training_chat_template(template, tok)[0]
    chats = [{"messages": c} for c in CONVERSATIONS]
    alpaca = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]
    for records in (chats, alpaca):
        trained = prepare_records(records, tok, template=template, max_len=512).examples
        again = prepare_records(records, saved, template="auto", max_len=512)
        assert again.template == template
        assert [(e.input_ids, e.roles) for e in again.examples] == [(e.input_ids, e.roles) for e in trained]


def test_forgetting_scores_a_full_model_with_the_bases_template(tmp_path):
    # a fully finetuned run's folder carries its training template: it was scored `chat`, the base `plain`
    from deltatune.evaluate.runs import Snapshot, snapshot_tokenizer

    carrying = tiny_tokenizer()
    carrying.chat_template = training_chat_template("alpaca", carrying)[0]
    carrying.save_pretrained(tmp_path)
    tiny_model().config.save_pretrained(tmp_path)
    base = tiny_tokenizer()
    base.chat_template = None
    assert snapshot_tokenizer(Snapshot(tmp_path, "model", None, "final"), base).chat_template is None


def test_the_tokenizers_own_template_stays():
    tok = tiny_tokenizer()
    assert training_chat_template("tokenizer", tok) == (None, "")
    assert training_chat_template("auto", tok) == (None, "")  # auto: the tokenizer's own


def test_the_alpaca_template_refuses_a_role_it_has_no_place_for():
    tok = tiny_tokenizer()
    jinja, _ = training_chat_template("alpaca", tok)
    msgs = [{"role": "user", "content": "a"}, {"role": "system", "content": "late system"}]
    with pytest.raises(Exception, match="no place for a system message"):
        tok.apply_chat_template(msgs, chat_template=jinja, tokenize=False)


@pytest.fixture
def base_model_dir(tmp_path):
    """A base model: its tokenizer has no chat template (and puts a BOS in front of text)."""
    path = tmp_path / "base"
    tiny_model().save_pretrained(path)
    _with_bos(tiny_tokenizer(), "<|endoftext|>").save_pretrained(path)
    return path


def test_a_base_models_adapter_is_prompted_as_trained_by_generate_serve_merge_and_eval(
    base_model_dir, data_file, tmp_path
):
    # trained with --template alpaca, inference rendered "user: ...\nassistant: " (generate), refused chats
    # (serve) and prompted `plain` (eval): the tokenizer saved with the adapter had no template
    from transformers import AutoTokenizer

    from deltatune.cli.generate import _chat_prompt
    from deltatune.cli.merge import merge_and_save
    from deltatune.evaluate.prompts import default_style
    from deltatune.models import load_model, load_tokenizer
    from deltatune.serve.adapters import MultiAdapterModel
    from deltatune.serve.engine import Engine
    from deltatune.train.loop import train

    cfg = tiny_train_config(base_model_dir, data_file, tmp_path / "run", template="alpaca", steps=2)
    train(cfg, quiet=True)
    final = tmp_path / "run" / "final"
    record = json.loads(data_file.read_text().splitlines()[0])
    messages = [{"role": "user", "content": record["instruction"]}]
    base_tok = load_tokenizer(base_model_dir)
    ex = prepare_records([record], base_tok, template="alpaca", max_len=512).examples[0]
    trained_prompt = ex.input_ids[: ex.roles.index(Role.RESPONSE)]

    saved = AutoTokenizer.from_pretrained(final)  # what any other tool loads beside the adapter
    assert saved.chat_template == training_chat_template("alpaca", base_tok)[0]

    model, tok = load_model(base_model_dir, adapter=final)
    assert tok(_chat_prompt(tok, messages), add_special_tokens=False)["input_ids"] == trained_prompt
    assert default_style(tok) == "chat"

    base, base_tok2 = load_model(base_model_dir)
    multi = MultiAdapterModel(base)
    assert multi.load("alpaca-run", final).chat_template == saved.chat_template
    engine = Engine(multi, base_tok2)
    assert engine.encode_chat(messages, multi.adapters["alpaca-run"].chat_template) == trained_prompt

    merged = merge_and_save(str(base_model_dir), str(final), str(tmp_path / "merged"), dtype="fp32", save_dtype=None)
    assert load_tokenizer(merged).chat_template == saved.chat_template


def test_plain_text_training_leaves_the_tokenizer_without_a_template(base_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from deltatune.train.loop import train

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"Document {i}: the quick brown fox."}) + "\n" for i in range(20)))
    train(tiny_train_config(base_model_dir, data, tmp_path / "run", steps=1), quiet=True)
    assert not AutoTokenizer.from_pretrained(tmp_path / "run" / "final").chat_template


def _carrying(template: str):
    tok = _with_bos(tiny_tokenizer(), "<|endoftext|>")
    tok.chat_template = training_chat_template(template, tok)[0]
    return tok


def test_eval_in_chat_style_with_a_carried_alpaca_template_stops_at_another_example():
    # chat style had no stops: a reply running on into "### Instruction: ..." was scored whole (BBH read the
    # run-on's answer, MBPP ran "### Instruction:" as code)
    from deltatune.evaluate.prompts import ALPACA_STOP, default_style, style_info

    style = style_info(default_style(_carrying("alpaca")), _carrying("alpaca"))
    assert style.name == "chat" and style.stop == ALPACA_STOP and style.label == "chat (training template alpaca)"
    assert style_info("chat", _carrying("chatml")).stop == ()  # ChatML stops on its <|im_end|> token
    assert style_info("chat", tiny_tokenizer()).label == "chat"  # the tokenizer's own template


def test_eval_prompts_a_carried_raw_template_plain():
    # raw writes no cue for where an answer starts, and eval's questions carry none: "...in Virginia?It rained"
    from deltatune.evaluate.prompts import default_style

    assert default_style(_carrying("raw")) == "plain"


def test_an_empty_system_message_keeps_alpacas_preamble():
    # training refuses an empty system message; `generate --system ""` rendered Alpaca with no preamble at all
    tok = _carrying("alpaca")
    msgs = [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}]
    plain = [{"role": "user", "content": "Hi"}]
    render = lambda m: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)  # noqa: E731
    assert render(msgs) == render(plain) and "Below is an instruction" in render(msgs)


def test_generate_cuts_an_alpaca_adapters_reply_at_another_example(base_model_dir, tmp_path, monkeypatch, capsys):
    # the run-on went into the interactive chat's history as a user turn never written
    import deltatune
    import deltatune.evaluate.generate as gen_module
    from deltatune.cli import main
    from deltatune.evaluate.prompts import ALPACA_STOP

    model, tok = deltatune.load_model(str(base_model_dir))
    deltatune.apply(model, "lora", rank=2).save_adapter(tmp_path / "adapter")
    _carrying("alpaca").save_pretrained(tmp_path / "adapter")
    seen = {}

    def fake_generate(model, tokenizer, prompts, config, **kwargs):
        seen["stop"] = config.stop
        return ["Paris."]

    monkeypatch.setattr(gen_module, "generate", fake_generate)
    args = ["generate", "--model", str(base_model_dir), "--adapter", str(tmp_path / "adapter"), "--prompt", "Hi"]
    assert main(args) == 0
    assert seen["stop"] == ALPACA_STOP and capsys.readouterr().out.strip() == "Paris."


def test_a_carried_chatml_template_on_a_vocabulary_without_its_tokens_renders_as_the_tokenizers():
    # `auto` returned chatml, which that tokenizer cannot build: a ConfigError where the Jinja renders fine
    from deltatune.data.templates import resolve_template

    tok = tiny_sentencepiece_tokenizer()
    tok.chat_template = training_chat_template("chatml", tiny_tokenizer())[0]
    assert resolve_template("auto", tok) == "tokenizer"
