"""The universal adapter-layer tests (the project spec ../shared/docs/methods.md, section 1) for DoRA, MoRA, (IA)3 and QLoRA.

Each case: a MethodSpec, how to randomise its adapter (so merge tests are not trivially at zero), and
its trainable-parameter formula written out from the tiny model's shapes (hidden 64, intermediate
128, 4 heads / 2 kv heads of dim 16 -> k/v out 32, 2 layers).
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltatune.methods.apply import apply_methods
from deltatune.methods.base import DeltaLinear, MethodSpec
from deltatune.testing import tiny_model

H, I, KV, L = 64, 128, 32, 2
# (d_in, d_out) of every linear in one layer, in all-linear order
SHAPES = {
    "q_proj": (H, H),
    "k_proj": (H, KV),
    "v_proj": (H, KV),
    "o_proj": (H, H),
    "gate_proj": (H, I),
    "up_proj": (H, I),
    "down_proj": (I, H),
}


def _rhat(d_in: int, d_out: int, r: int, even: bool) -> int:
    n = int(math.floor(math.sqrt((d_in + d_out) * r) + 0.5))
    return n - n % 2 if even else n


CASES = {
    "mora-6": (
        MethodSpec("mora", rank=4, options={"mora_type": 6}),
        sum(_rhat(a, b, 4, True) ** 2 for a, b in SHAPES.values()) * L,
    ),
    "mora-1": (
        MethodSpec("mora", rank=4, options={"mora_type": 1}),
        sum(_rhat(a, b, 4, False) ** 2 for a, b in SHAPES.values()) * L,
    ),
    "mora-2-qv": (
        MethodSpec("mora", targets="q_proj,v_proj", rank=2, options={"mora_type": 2}),
        (_rhat(H, H, 2, False) ** 2 + _rhat(H, KV, 2, False) ** 2) * L,
    ),
    # QLoRA = LoRA's count, r (d_in + d_out); fp32 compute so that 1e-5 tolerances apply
    "qlora": (
        MethodSpec("qlora", rank=4, alpha=8, options={"compute_dtype": "float32"}),
        sum(4 * (a + b) for a, b in SHAPES.values()) * L,
    ),
    "mora-nf4": (
        MethodSpec(
            "mora",
            targets="q_proj,down_proj",
            rank=4,
            options={"mora_type": 6, "quantize_base": True, "compute_dtype": "float32"},
        ),
        (_rhat(H, H, 4, True) ** 2 + _rhat(I, H, 4, True) ** 2) * L,
    ),
    # DoRA = LoRA's r (d_in + d_out) + d_out magnitudes per adapted matrix
    "dora": (MethodSpec("dora", rank=4, alpha=8), sum(4 * (a + b) + b for a, b in SHAPES.values()) * L),
    "dora-exact-qv": (
        MethodSpec("dora", targets="q_proj,v_proj", rank=2, alpha=4, options={"exact_grad": True}),
        (2 * (H + H) + H + 2 * (H + KV) + KV) * L,
    ),
    "dora-nf4": (
        MethodSpec(
            "dora",
            targets="o_proj,up_proj",
            rank=4,
            alpha=8,
            options={"quantize_base": True, "compute_dtype": "float32"},
        ),
        (4 * (H + H) + H + 4 * (H + I) + I) * L,
    ),
    # (IA)3: d_k + d_v + d_ff per layer (k/v outputs, down_proj input)
    "ia3": (MethodSpec("ia3"), (KV + KV + I) * L),
    "ia3-qv-up": (
        MethodSpec("ia3", targets="q_proj,v_proj,up_proj", options={"feedforward_modules": ["up_proj"]}),
        (H + KV + H) * L,
    ),
    # the NF4 base composes under every weight-delta method: (IA)3 and VeRA too
    "ia3-nf4": (MethodSpec("ia3", options={"quantize_base": True, "compute_dtype": "float32"}), (KV + KV + I) * L),
    "vera-nf4": (
        MethodSpec(
            "vera", targets="q_proj,down_proj", rank=4, options={"quantize_base": True, "compute_dtype": "float32"}
        ),
        (H + 4 + H + 4) * L,
    ),
}
QUANTISED = {
    "qlora": "all-linear",
    "mora-nf4": "q_proj,down_proj",
    "dora-nf4": "o_proj,up_proj",
    "ia3-nf4": "k_proj,v_proj,down_proj",
    "vera-nf4": "q_proj,down_proj",
}


def _reference(case: str):
    """The model the adapter must reproduce at init / when disabled: the base, with the adapted
    linears' weights replaced by their NF4 round trip for the quantised cases."""
    model = tiny_model(0)
    if case in QUANTISED:
        from deltatune.methods.inject import match_targets
        from deltatune.methods.nf4 import dequantize_nf4, quantize_nf4

        with torch.no_grad():
            for name in match_targets(model, QUANTISED[case]):
                w = model.get_submodule(name).weight
                w.copy_(dequantize_nf4(quantize_nf4(w)))
    return model


def _tokens() -> torch.Tensor:
    return torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(1))


def _adapted(case: str, seed: int = 0):
    spec, _ = CASES[case]
    model = tiny_model(seed)
    return apply_methods(model, MethodSpec(**{**spec.__dict__, "options": dict(spec.options)}))


@torch.no_grad()
def _randomise(adapted, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, p in adapted.trainable_parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _base_weights(model) -> dict[str, torch.Tensor]:
    """Plain-model names -> tensors (a wrapper's `x.base.weight` is reported as `x.weight`)."""
    return {n.replace(".base.", "."): t.detach().clone() for n, t in model.state_dict().items()}


@pytest.fixture(params=sorted(CASES))
def case(request):
    return request.param


def test_identity_at_init(case):
    ids = _tokens()
    base = _logits(_reference(case), ids)
    adapted = _adapted(case)
    torch.testing.assert_close(_logits(adapted.model, ids), base, atol=1e-6, rtol=0)


def test_merge_equals_unmerged_and_unmerge_restores(case):
    ids = _tokens()
    adapted = _adapted(case)
    _randomise(adapted)
    reference = _reference(case)
    state = {name: t.clone() for name, t in adapted.model.state_dict().items()}
    unmerged = _logits(adapted.model, ids)
    assert (unmerged - _logits(reference, ids)).abs().max() > 1e-3  # the adapter does something
    adapted.merge()
    torch.testing.assert_close(_logits(adapted.model, ids), unmerged, atol=1e-5, rtol=0)
    with pytest.warns(UserWarning, match="already merged"):
        next(m for meth in adapted.methods for m in meth.delta_modules(adapted.model)).merge()
    adapted.unmerge()
    # the model before the merge, bit for bit: an NF4 base comes back as its NF4 codes (it came back dequantised,
    # computing in fp32 where the NF4 product computes in its compute dtype: logits moved by up to 2.2e-3)
    after = adapted.model.state_dict()
    assert after.keys() == state.keys()
    for name, t in state.items():
        assert torch.equal(after[name], t), name
    assert torch.equal(_logits(adapted.model, ids), unmerged)


def test_disable_gives_base_exactly(case):
    ids = _tokens()
    adapted = _adapted(case)
    _randomise(adapted)
    with adapted.disable_adapters():
        out = _logits(adapted.model, ids)
    assert torch.equal(out, _logits(_reference(case), ids))


def test_parameter_count_and_only_adapters_train(case):
    adapted = _adapted(case)
    _, expected = CASES[case]
    trainable = adapted.trainable_parameters()
    assert sum(p.numel() for _, p in trainable) == expected
    names = {n for n, _ in trainable}
    assert names == {n for n, p in adapted.model.named_parameters() if p.requires_grad}
    assert not any(".base." in n for n in names)


def test_adamw_steps_lower_loss_and_leave_base_bit_identical(case):
    adapted = _adapted(case)
    model = adapted.model
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids = _tokens()
    opt = torch.optim.AdamW([p for _, p in adapted.trainable_parameters()], lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_save_load_round_trip(case, tmp_path):
    ids = _tokens()
    adapted = _adapted(case)
    _randomise(adapted, seed=3)
    expected = _logits(adapted.model, ids)
    save_file({k: v.contiguous() for k, v in adapted.adapter_state_dict().items()}, tmp_path / "a.safetensors")
    fresh = _adapted(case)
    fresh.load_adapter_state_dict(load_file(tmp_path / "a.safetensors"))
    assert torch.equal(_logits(fresh.model, ids), expected)


def test_delta_modules_are_delta_linears(case):
    adapted = _adapted(case)
    mods = [m for meth in adapted.methods for m in meth.delta_modules(adapted.model)]
    assert mods and all(isinstance(m, DeltaLinear) for m in mods)
