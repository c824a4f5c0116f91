"""Prompt tuning: virtual tokens spliced in through decoder hooks; outputs aligned to the real tokens.

The central check is exact: virtual embeddings copied from real tokens t make the adapted model on x
equal the base model on t+x at x's positions; PEFT's PromptTuning is the second reference.
"""

import pytest
import torch

from deltatune.errors import ConfigError
from deltatune.kv_cache import cache_kwargs
from deltatune.methods.apply import AdaptedModel
from deltatune.methods.base import MethodSpec, get_method
from deltatune.methods.inject import freeze
from deltatune.testing import tiny_model

PREFIX = [5, 9, 33]  # the real tokens the virtual ones copy
X = torch.tensor([[70, 2, 11, 40, 8, 17], [12, 13, 14, 15, 16, 18]])


def prompt(model, **options):
    freeze(model)
    options.setdefault("num_virtual_tokens", 3)
    method = get_method("prompt")(MethodSpec(name="prompt", options=options))
    method.apply(model)
    return method


def with_prefix(x):
    return torch.cat([torch.tensor(PREFIX).expand(x.shape[0], -1), x], dim=1)


def test_virtual_tokens_equal_real_prefix_tokens():
    base, model = tiny_model(0), tiny_model(0)
    prompt(model, init_token_ids=PREFIX)
    p = len(PREFIX)
    ref_h = base.model(with_prefix(X)).last_hidden_state[:, p:]
    # the lead's loop calls the decoder body with 2D mask and explicit positions
    mask, pos = torch.ones_like(X), torch.arange(X.shape[1]).expand_as(X)
    h = model.get_decoder()(input_ids=X, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    assert h.shape == (*X.shape, model.config.hidden_size)
    torch.testing.assert_close(h, ref_h, rtol=0, atol=1e-5)
    logits = model(X).logits
    assert logits.shape[:2] == X.shape
    torch.testing.assert_close(logits, base(with_prefix(X)).logits[:, p:], rtol=0, atol=1e-5)


def _packed_mask(lengths):
    """Block-diagonal causal 4D bool mask [1, 1, T, T] and per-example positions, as the packer builds."""
    total = sum(lengths)
    mask = torch.zeros(total, total, dtype=torch.bool)
    pos, start = [], 0
    for n in lengths:
        mask[start : start + n, start : start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        pos += list(range(n))
        start += n
    return mask[None, None], torch.tensor([pos])


@pytest.mark.parametrize("additive", [False, True])
def test_packed_rows_see_the_virtual_tokens_like_solo_runs(additive):
    model = tiny_model(0)
    prompt(model)
    a, b = [70, 2, 11, 40], [12, 13, 14]
    mask, pos = _packed_mask([4, 3])
    if additive:
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    packed = model.get_decoder()(
        input_ids=torch.tensor([a + b]), attention_mask=mask, position_ids=pos, use_cache=False
    ).last_hidden_state
    solo_a = model.get_decoder()(input_ids=torch.tensor([a]), use_cache=False).last_hidden_state
    solo_b = model.get_decoder()(input_ids=torch.tensor([b]), use_cache=False).last_hidden_state
    torch.testing.assert_close(packed[:, :4], solo_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[:, 4:], solo_b, rtol=0, atol=1e-5)


def test_matches_peft_prompt_tuning():
    from peft import PromptTuningConfig, get_peft_model, set_peft_model_state_dict

    model = tiny_model(0)
    method = prompt(model, num_virtual_tokens=4)
    emb = dict(method.trainable_parameters(model))["deltatune_prompt.embedding"]
    peft_model = get_peft_model(tiny_model(0), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    set_peft_model_state_dict(peft_model, {"prompt_embeddings": emb.detach().clone()})
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])  # right padding in the second row
    ours = model(X, attention_mask=mask).logits
    theirs = peft_model(input_ids=X, attention_mask=mask).logits[:, 4:]
    for row, n in enumerate((6, 4)):
        torch.testing.assert_close(ours[row, :n], theirs[row, :n], rtol=0, atol=1e-5)


def test_parameter_count_frozen_base_and_training_lowers_loss():
    model = tiny_model(0)
    method = prompt(model, num_virtual_tokens=5)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, _ in trainable] == ["deltatune_prompt.embedding"]
    assert trainable[0][1].numel() == 5 * model.config.hidden_size  # p * d_model
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam([p for _, p in method.trainable_parameters(model)], lr=5e-2)
    losses = []
    for _ in range(10):
        loss = model(X, labels=X).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_labels_count_exactly_the_base_targets():
    """HF's own loss on sliced logits: same shifted targets as the base model, none for virtual tokens."""
    model = tiny_model(0)
    prompt(model)
    out = model(X, labels=X)
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), X[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(out.loss, expected)


def test_output_changes_only_through_the_virtual_tokens():
    base, model = tiny_model(0), tiny_model(0)
    method = prompt(model)
    with AdaptedModel(model, [method]).disable_adapters():
        torch.testing.assert_close(model(X).logits, base(X).logits, rtol=0, atol=0)
    before = model(X).logits
    assert not torch.allclose(before, base(X).logits, atol=1e-3)
    with torch.no_grad():
        emb = dict(method.trainable_parameters(model))["deltatune_prompt.embedding"]
        emb.add_(1.0)
    assert not torch.allclose(model(X).logits, before, atol=1e-3)


def test_cached_decoding_continues_after_the_virtual_tokens():
    model = tiny_model(0)
    prompt(model)
    full = model(X).logits
    out = model(X[:, :-1], use_cache=True)
    step = model(X[:, -1:], **cache_kwargs(model, out.past_key_values), attention_mask=torch.ones_like(X))
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], rtol=0, atol=1e-5)


def test_text_init_uses_the_tokenised_string_repeated(tiny_tok):
    model = tiny_model(0)
    freeze(model)
    method = get_method("prompt")(
        MethodSpec(name="prompt", options={"num_virtual_tokens": 7, "init_text": "fox jumps"})
    )
    method.tokenizer = tiny_tok
    method.apply(model)
    ids = tiny_tok("fox jumps", add_special_tokens=False)["input_ids"]
    assert 1 < len(ids) < 7
    expected_ids = (ids * 7)[:7]
    assert method.spec.options["init_token_ids"] == expected_ids  # the saved spec needs no tokenizer
    table = model.get_input_embeddings().weight
    torch.testing.assert_close(model.deltatune_prompt.embedding, table[expected_ids], rtol=0, atol=0)


def test_text_init_without_tokenizer_is_a_config_error():
    with pytest.raises(ConfigError, match="init_text needs the tokenizer"):
        prompt(tiny_model(0), init_text="hello")


def test_merge_says_why_not_and_bad_options():
    model = tiny_model(0)
    method = prompt(model)
    with pytest.raises(ConfigError, match="cannot be merged: prompt tuning adds virtual input tokens"):
        method.merge(model)
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        get_method("prompt")(MethodSpec(name="prompt", options={"num_virtual_tokens": 0}))
    with pytest.raises(ConfigError, match="unknown option 'length' for method 'prompt'; valid options"):
        get_method("prompt")(MethodSpec(name="prompt", options={"length": 3}))


def test_save_load_round_trip_through_peft_format(tmp_path):
    from peft import PeftModel

    from deltatune.methods.apply import apply_methods, load_adapter

    model = tiny_model(0)
    adapted = apply_methods(model, MethodSpec(name="prompt", options={"num_virtual_tokens": 4}))
    assert adapted.is_peft_method
    adapted.save_adapter(tmp_path / "a")
    loaded = load_adapter(tiny_model(0), tmp_path / "a")
    torch.testing.assert_close(loaded.model(X).logits, model(X).logits, rtol=0, atol=0)
    peft_model = PeftModel.from_pretrained(tiny_model(0), str(tmp_path / "a"))
    torch.testing.assert_close(peft_model(input_ids=X).logits[:, 4:], model(X).logits, rtol=0, atol=1e-5)


# --- Lester et al.'s initialisations: sampled vocabulary and class-label words -------------------------
def test_sampled_vocabulary_init_takes_distinct_ids_from_the_first_vocab_top(tiny_tok):
    model = tiny_model(0)
    method = get_method("prompt")(
        MethodSpec("prompt", options={"num_virtual_tokens": 6, "init": "vocab", "vocab_top": 40, "tokenizer": tiny_tok})
    )
    method.apply(model)
    table = model.get_input_embeddings().weight
    rows = model.deltatune_prompt.embedding.detach()
    ids = [int((table == r).all(dim=1).nonzero()[0]) for r in rows]  # each row is one vocabulary embedding
    assert len(set(ids)) == 6 and all(i < 40 for i in ids)
    assert not set(ids) & set(tiny_tok.all_special_ids)
    again = tiny_model(0)
    get_method("prompt")(
        MethodSpec("prompt", options={"num_virtual_tokens": 6, "init": "vocab", "vocab_top": 40, "tokenizer": tiny_tok})
    ).apply(again)
    assert torch.equal(again.deltatune_prompt.embedding, model.deltatune_prompt.embedding)  # seeded


def test_class_label_init_averages_multi_token_labels_and_fills_with_vocabulary(tiny_tok):
    model = tiny_model(0)
    labels = ["fox", "The answer is"]
    method = get_method("prompt")(
        MethodSpec("prompt", options={"num_virtual_tokens": 4, "class_labels": labels, "tokenizer": tiny_tok})
    )
    assert method.init == "labels"
    method.apply(model)
    table = model.get_input_embeddings().weight
    rows = model.deltatune_prompt.embedding.detach()
    for i, word in enumerate(labels):
        ids = tiny_tok(word, add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(rows[i], table[ids].mean(0), rtol=0, atol=0)
    assert len(tiny_tok("The answer is", add_special_tokens=False)["input_ids"]) > 1  # really multi-token
    for r in rows[2:]:
        assert (table == r).all(dim=1).any()  # the rest: sampled vocabulary embeddings
    # the recorded label ids re-apply without the tokenizer (what loading a saved adapter does)
    assert method.spec.options["class_label_ids"][1] == tiny_tok("The answer is", add_special_tokens=False)["input_ids"]
    with pytest.raises(ConfigError, match="3 class labels do not fit in 2 virtual tokens"):
        get_method("prompt")(
            MethodSpec("prompt", options={"num_virtual_tokens": 2, "class_label_ids": [[5], [6], [7]]})
        ).apply(tiny_model(0))


def test_training_from_a_config_gives_the_method_the_models_tokenizer(tmp_path, tiny_dir, data_file, tiny_tok):
    """A config can name init_text but not hold a tokenizer: the trainer passes the model's own."""
    from reliability_helpers import train_args
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from deltatune.cli import main

    options = "method_options={init_text: 'fox jumps', num_virtual_tokens: 5}"
    args = train_args(tiny_dir, data_file, tmp_path / "run", "--method", "prompt", "--lr", "1e-9", steps=1)
    assert main([str(a) for a in [*args, "--set", options]]) == 0
    trained = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors"))["prompt_embeddings"]
    ids = tiny_tok("fox jumps", add_special_tokens=False)["input_ids"]
    table = AutoModelForCausalLM.from_pretrained(tiny_dir).get_input_embeddings().weight.detach()
    torch.testing.assert_close(trained, table[(ids * 5)[:5]], rtol=0, atol=1e-6)  # one step at lr 1e-9 from there
