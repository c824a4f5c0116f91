"""Prefix tuning through the cache interface.

The clean equivalent of "zero values, -inf keys gives the base": a prefix holding the base model's own
keys and values for real tokens t must make the adapted model on x equal the base model on t+x at x's
positions (checks keys, values, rotary positions and masks at once, to float rounding). PEFT's
PrefixTuning (same weights, PEFT's key layout) is the second reference, with and without the MLP.
"""

import pytest
import torch

from deltatune.errors import ConfigError
from deltatune.kv_cache import cache_kwargs
from deltatune.methods.apply import AdaptedModel
from deltatune.methods.base import MethodSpec, get_method
from deltatune.methods.inject import freeze
from deltatune.testing import tiny_model

PREFIX = [5, 9, 33]
X = torch.tensor([[70, 2, 11, 40, 8, 17], [12, 13, 14, 15, 16, 18]])


def prefix(model, **options):
    freeze(model)
    options.setdefault("num_virtual_tokens", 3)
    method = get_method("prefix")(MethodSpec(name="prefix", options=options))
    method.apply(model)
    return method


def with_prefix(x):
    return torch.cat([torch.tensor(PREFIX).expand(x.shape[0], -1), x], dim=1)


def test_real_token_prefix_equals_base_on_concatenated_input():
    base, model = tiny_model(0), tiny_model(0)
    prefix(model, init_token_ids=PREFIX)
    p = len(PREFIX)
    mask, pos = torch.ones_like(X), torch.arange(X.shape[1]).expand_as(X)
    out = model.get_decoder()(input_ids=X, attention_mask=mask, position_ids=pos, use_cache=False)
    assert out.past_key_values is None  # the per-call cache is not handed back when not asked for
    torch.testing.assert_close(
        out.last_hidden_state, base.model(with_prefix(X)).last_hidden_state[:, p:], rtol=0, atol=1e-5
    )
    torch.testing.assert_close(model(X).logits, base(with_prefix(X)).logits[:, p:], rtol=0, atol=1e-5)


def _packed_mask(lengths):
    total = sum(lengths)
    mask = torch.zeros(total, total, dtype=torch.bool)
    pos, start = [], 0
    for n in lengths:
        mask[start : start + n, start : start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        pos += list(range(n))
        start += n
    return mask[None, None], torch.tensor([pos])


def test_packed_rows_see_the_prefix_like_solo_runs():
    model = tiny_model(0)
    prefix(model)
    a, b = [70, 2, 11, 40], [12, 13, 14]
    mask, pos = _packed_mask([4, 3])
    dec = model.get_decoder()
    packed = dec(input_ids=torch.tensor([a + b]), attention_mask=mask, position_ids=pos, use_cache=False)
    solo_a = dec(input_ids=torch.tensor([a]), use_cache=False).last_hidden_state
    solo_b = dec(input_ids=torch.tensor([b]), use_cache=False).last_hidden_state
    torch.testing.assert_close(packed.last_hidden_state[:, :4], solo_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed.last_hidden_state[:, 4:], solo_b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("reparameterize", [False, True])
def test_matches_peft_prefix_tuning(reparameterize):
    from peft import PrefixTuningConfig, get_peft_model

    model = tiny_model(0)
    method = prefix(model, num_virtual_tokens=4, reparameterize=reparameterize, hidden=16)
    peft_model = get_peft_model(
        tiny_model(0),
        PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=reparameterize, encoder_hidden_size=16
        ),
    )
    enc, ours = peft_model.prompt_encoder["default"], model.deltatune_prefix
    with torch.no_grad():
        if reparameterize:
            enc.embedding.weight.copy_(ours.embedding)
            enc.transform[0].weight.copy_(ours.w1)
            enc.transform[0].bias.copy_(ours.b1)
            enc.transform[2].weight.copy_(ours.w2)
            enc.transform[2].bias.copy_(ours.b2)
        else:
            enc.embedding.weight.copy_(ours.prefix)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    theirs = peft_model(input_ids=X, attention_mask=mask).logits
    mine = model(X, attention_mask=mask).logits
    for row, n in enumerate((6, 4)):
        torch.testing.assert_close(mine[row, :n], theirs[row, :n], rtol=0, atol=1e-5)
    assert dict(method.trainable_parameters(model)).keys() == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


def test_parameter_counts():
    cfg = tiny_model(0).config
    L, p, h = cfg.num_hidden_layers, 4, 16
    kv_dim = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)  # GQA: 2 heads x 16
    assert kv_dim == 32
    plain = tiny_model(0)
    m = prefix(plain, num_virtual_tokens=p)
    assert sum(t.numel() for _, t in m.trainable_parameters(plain)) == L * 2 * p * kv_dim
    rep = tiny_model(0)
    m = prefix(rep, num_virtual_tokens=p, reparameterize=True, hidden=h)
    expected = p * kv_dim + (kv_dim * h + h) + (h * L * 2 * kv_dim + L * 2 * kv_dim)
    assert sum(t.numel() for _, t in m.trainable_parameters(rep)) == expected


@pytest.mark.parametrize("reparameterize", [False, True])
def test_training_lowers_loss_and_base_stays_frozen(reparameterize):
    model = tiny_model(0)
    method = prefix(model, num_virtual_tokens=4, reparameterize=reparameterize, hidden=16)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam([p for _, p in method.trainable_parameters(model)], lr=1e-2)
    losses = []
    for _ in range(10):
        loss = model(X, labels=X).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_disabled_equals_base_and_cached_decoding_continues():
    base, model = tiny_model(0), tiny_model(0)
    adapted = AdaptedModel(model, [prefix(model)])
    with adapted.disable_adapters():
        torch.testing.assert_close(model(X).logits, base(X).logits, rtol=0, atol=0)
    full = model(X).logits
    assert not torch.allclose(full, base(X).logits, atol=1e-3)
    out = model(X[:, :-1], use_cache=True)
    assert out.past_key_values.get_seq_length() == 3 + X.shape[1] - 1
    step = model(X[:, -1:], **cache_kwargs(model, out.past_key_values), attention_mask=torch.ones_like(X))
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], rtol=0, atol=1e-5)


def test_fold_keeps_outputs_and_enables_peft_export(tmp_path):
    from peft import PeftModel

    from deltatune.methods.apply import apply_methods, load_adapter

    model = tiny_model(0)
    adapted = apply_methods(
        model, MethodSpec(name="prefix", options={"num_virtual_tokens": 4, "reparameterize": True, "hidden": 16})
    )
    assert not adapted.is_peft_method  # the MLP is deltatune's until folded
    before = model(X).logits
    adapted.methods[0].fold(model)
    torch.testing.assert_close(model(X).logits, before, rtol=0, atol=1e-6)
    assert [n for n, _ in adapted.trainable_parameters()] == ["deltatune_prefix.prefix"]
    assert adapted.is_peft_method
    adapted.save_adapter(tmp_path / "a")
    loaded = load_adapter(tiny_model(0), tmp_path / "a")
    torch.testing.assert_close(loaded.model(X).logits, before, rtol=0, atol=1e-6)
    peft_model = PeftModel.from_pretrained(tiny_model(0), str(tmp_path / "a"))
    torch.testing.assert_close(peft_model(input_ids=X).logits, before, rtol=0, atol=1e-5)


def test_unfolded_reparameterisation_round_trips_in_deltatune_format(tmp_path):
    from deltatune.methods.apply import apply_methods, load_adapter

    model = tiny_model(0)
    adapted = apply_methods(
        model, MethodSpec(name="prefix", options={"num_virtual_tokens": 2, "reparameterize": True, "hidden": 8})
    )
    adapted.save_adapter(tmp_path / "a")
    loaded = load_adapter(tiny_model(0), tmp_path / "a")
    torch.testing.assert_close(loaded.model(X).logits, model(X).logits, rtol=0, atol=0)


def test_merge_says_why_not_and_bad_options():
    model = tiny_model(0)
    method = prefix(model)
    with pytest.raises(ConfigError, match="cannot be merged: prefix tuning adds key/value vectors"):
        method.merge(model)
    with pytest.raises(ConfigError, match="reparameterize"):
        get_method("prefix")(MethodSpec(name="prefix", options={"reparameterize": "yes"}))
    with pytest.raises(ConfigError, match="reparameterize: false"):
        get_method("prefix")(MethodSpec(name="prefix", options={"reparameterize": True, "init_token_ids": [1]}))
