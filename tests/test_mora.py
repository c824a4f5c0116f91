"""MoRA: the explicit delta W equals the forward operator, against an independent reading of the paper's
operators (the project spec ../shared/docs/methods.md, section 4), parameter counts, ranks and edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.methods.base import MethodSpec, get_method
from deltatune.methods.mora import MORA_TYPES, MoRALinear, default_mora_type, mora_rank
from deltatune.testing import tiny_model

SHAPES = [(64, 64), (60, 100), (100, 60), (48, 176), (30, 30)]
RANKS = [2, 4, 8]


def _layer(d_in: int, d_out: int, r: int, t, seed: int = 0, dtype=torch.float32) -> MoRALinear:
    torch.manual_seed(seed)
    layer = MoRALinear(nn.Linear(d_in, d_out, dtype=dtype), r, t, dtype=dtype)
    with torch.no_grad():
        layer.mora_M.normal_()
    return layer


@pytest.mark.parametrize("t", MORA_TYPES)
@pytest.mark.parametrize("shape", SHAPES + [(4, 176)])
def test_basis_pushforward_equals_delta_weight(shape, t):
    d_in, d_out = shape
    for r in RANKS:
        layer = _layer(d_in, d_out, r, t)
        eye = torch.eye(d_in)
        pushed = (layer(eye) - layer.base(eye)).T  # column i = delta W e_i
        torch.testing.assert_close(layer.delta_weight(), pushed, atol=1e-6, rtol=0)


def _reference_forward(x: torch.Tensor, M: torch.Tensor, d_out: int, t: int) -> torch.Tensor:
    """A literal, loop-based float64 reading of the spec's operators for one vector x (pad <= d_in)."""
    r, d_in = M.shape[0], x.shape[0]
    pad = (-d_in) % r
    xp = torch.cat([x, x[:pad]])  # wrap-padding: append the first `pad` entries of x itself
    nb = xp.shape[0] // r
    if t in (1, 4):
        c = sum(xp[i * r : (i + 1) * r] for i in range(nb))
    elif t in (2, 3):
        base, extra = divmod(d_in, r)
        c, start = torch.zeros(r, dtype=x.dtype), 0
        for j in range(r):
            size = base + (1 if j < extra else 0)
            c[j] = x[start : start + size].sum()
            start += size
    if t in (1, 2, 3, 4):
        z = M @ c
        if t in (1, 3):
            return torch.stack([z[o % r] for o in range(d_out)])
        base, extra = divmod(d_out, r)
        out = []
        for j in range(r):
            out += [z[j]] * (base + (1 if j < extra else 0))
        return torch.stack(out)
    outs = []
    for i in range(nb):  # type 6: rotate block i by RoPE at position i, then M
        blk = xp[i * r : (i + 1) * r]
        rot = torch.zeros(r, dtype=x.dtype)
        for k in range(r):
            theta = i * 10000 ** (-2 * (k % (r // 2)) / r)
            partner = -blk[k + r // 2] if k < r // 2 else blk[k - r // 2]
            rot[k] = blk[k] * math.cos(theta) + partner * math.sin(theta)
        outs.append(M @ rot)
    flat = torch.cat(outs)
    return torch.stack([flat[o % flat.shape[0]] for o in range(d_out)])


@pytest.mark.parametrize("t", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_literal_reference(shape, t):
    d_in, d_out = shape
    layer = _layer(d_in, d_out, 4, t).double()
    x = torch.randn(d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ours = layer(x[None])[0] - layer.base(x[None])[0]
    ref = _reference_forward(x, layer.mora_M.detach(), d_out, t)
    # type 6's cos/sin tables are fp32, like the official code's, even when x is float64
    torch.testing.assert_close(ours, ref, atol=1e-5 if t == 6 else 1e-10, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("r", [1, 4, 8, 16])
def test_parameter_count_is_rhat_squared_within_rounding_bound(shape, r):
    d_in, d_out = shape
    for t in (1, 6):
        layer = MoRALinear(nn.Linear(d_in, d_out), r, t)
        r_hat = layer.r_hat
        assert sum(p.numel() for n, p in layer.named_parameters() if p.requires_grad) == r_hat**2
        slack = 2 * r_hat + 1 + (4 * r_hat + 4 if t == 6 else 0)  # flooring to even costs at most one more
        assert abs(r_hat**2 - r * (d_in + d_out)) <= slack
        if t == 6:
            assert r_hat % 2 == 0


def test_rhat_examples_from_the_spec():
    assert mora_rank(4096, 4096, 8, 1) == 256
    assert mora_rank(4096, 4096, 256, 1) == 1448
    assert mora_rank(4096, 11008, 8, 1) == 348
    assert mora_rank(896, 128, 8, 1) == 91 and mora_rank(896, 128, 8, 6) == 90
    assert mora_rank(896, 4864, 8, 1) == 215 and mora_rank(896, 4864, 8, 6) == 214


@pytest.mark.parametrize("shape", SHAPES)
def test_rank_of_delta(shape):
    d_in, d_out = shape
    for t in (1, 2, 3, 4):
        layer = _layer(d_in, d_out, 4, t)
        assert torch.linalg.matrix_rank(layer.delta_weight().double()) <= layer.r_hat
    layer = _layer(d_in, d_out, 4, 6)
    if d_in >= layer.r_hat:
        assert torch.linalg.matrix_rank(layer.delta_weight().double()) == min(d_in, d_out)


def test_sharing_rank_equals_rhat_when_dims_allow():
    layer = _layer(64, 64, 4, 1)
    assert torch.linalg.matrix_rank(layer.delta_weight().double()) == layer.r_hat


def test_single_block_and_rhat_beyond_twice_d_in():
    # d_in = 4 with r_hat = 54 > 2 d_in: the official reshape fails; cyclic wrap-padding is defined.
    for t in MORA_TYPES:
        layer = _layer(4, 176, 16, t)
        assert layer.r_hat > 2 * 4 and layer.n_blocks == 1
        eye = torch.eye(4)
        torch.testing.assert_close(layer.delta_weight(), (layer(eye) - layer.base(eye)).T, atol=1e-6, rtol=0)


def test_rope_tables_follow_dtype_and_bf16_forward_close_to_fp32():
    layer = _layer(60, 100, 4, 6)
    x = torch.randn(3, 60)
    ref = layer(x) - layer.base(x)
    layer16 = layer.to(torch.bfloat16)  # buffers and M move together; tables are cast per call
    out = (layer16(x.bfloat16()) - layer16.base(x.bfloat16())).float()
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


def test_zero_at_init_and_default_type_by_rank():
    assert default_mora_type(8) == 6 and default_mora_type(256) == 1 and default_mora_type(128) == 1
    layer = MoRALinear(nn.Linear(64, 64), 8)
    assert layer.mora_type == 6 and torch.count_nonzero(layer.delta_weight()) == 0


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="mora_type"):
        get_method("mora")(MethodSpec("mora", options={"mora_type": 5}))
    with pytest.raises(ConfigError, match="unknown option 'mora_typo' for method 'mora'; valid options"):
        get_method("mora")(MethodSpec("mora", options={"mora_typo": 1}))
    assert get_method("mora")(MethodSpec("mora", options={"mora_type": "6"})).mora_type == 6


# --- ReMoRA ------------------------------------------------------------------------------------------
def test_remora_merge_and_reset_keeps_logits_sets_m_to_zero_and_cycles_types():
    from deltatune.methods.apply import apply_methods
    from deltatune.train.loop import after_step_hooks

    adapted = apply_methods(
        tiny_model(0), MethodSpec("mora", rank=4, options={"remora_every": 2, "remora_types": 4, "remora_warmup": 4})
    )
    method, model = adapted.methods[0], adapted.model
    assert method.writes_full_model and {m.mora_type for m in method.delta_modules(model)} == {1}
    params = [p for _, p in adapted.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=1.0)
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    for cycle_type, (plain_step, merge_step), lr_between in ((2, (1, 2), 1.0), (3, (3, 4), 0.5)):
        with torch.no_grad():
            for p in params:
                p.normal_(0, 0.05)
        model(ids).logits.sum().backward()
        opt.step()
        assert all(p in opt.state for p in params)
        before = model(ids).logits.detach()
        after_step_hooks(adapted, opt, plain_step)  # not a merge step: no reset (lr still re-warming after one)
        assert all(p in opt.state for p in params) and opt.param_groups[0]["lr"] == pytest.approx(lr_between)
        opt.param_groups[0]["lr"] = 1.0
        after_step_hooks(adapted, opt, merge_step)
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-5)  # merged into W, M restarted
        assert all(torch.count_nonzero(p) == 0 for p in params)
        assert not any(p in opt.state for p in params)  # the adapter's optimizer state was reset
        assert {m.mora_type for m in method.delta_modules(model)} == {cycle_type}
        assert opt.param_groups[0]["lr"] == pytest.approx(0.25)  # re-warmup: 1 of 4 steps
        opt.param_groups[0]["lr"] = 1.0


def test_remora_refuses_types_outside_its_cycle_and_an_nf4_base():
    with pytest.raises(ConfigError, match="ReMoRA cycles the types"):
        get_method("mora")(MethodSpec("mora", options={"remora_every": 5, "mora_type": 6}))
    with pytest.raises(ConfigError, match="quantize_base"):
        get_method("mora")(MethodSpec("mora", options={"remora_every": 5, "quantize_base": True}))


def test_remora_merge_into_a_tied_lm_head_leaves_the_embeddings_alone():
    """lm_head shares the input embeddings' weight in the tiny model: ReMoRA's merge unties it first."""
    from deltatune.methods.apply import apply_methods

    model = tiny_model(0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    adapted = apply_methods(model, MethodSpec("mora", rank=4, targets="lm_head", options={"remora_every": 1}))
    with torch.no_grad():
        adapted.methods[0].delta_modules(model)[0].mora_M.normal_(0, 0.05)
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    embeddings = model.model.embed_tokens.weight.detach().clone()
    before = model(ids).logits.detach()
    adapted.methods[0].after_step(model, 1)
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    assert not model.config.tie_word_embeddings
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-5)
