"""NF4 quantiser and the QLoRA layer (the project spec ../shared/docs/methods.md, section 5)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltatune.methods.apply import apply_methods
from deltatune.methods.base import MethodSpec
from deltatune.methods.lora import LoRALinear
from deltatune.methods.nf4 import (
    NF4_CODE,
    NF4Linear,
    dequantize_nf4,
    dynamic_map_8bit,
    nf4_code_from_quantiles,
    pack_4bit,
    quantize_nf4,
    unpack_4bit,
)
from deltatune.testing import tiny_model

SPEC_VALUES = [
    -1.0,
    -0.6961928,
    -0.5250731,
    -0.3949175,
    -0.2844414,
    -0.1847734,
    -0.0910500,
    0.0,
    0.0795803,
    0.1609302,
    0.2461123,
    0.3379152,
    0.4407098,
    0.5626170,
    0.7229568,
    1.0,
]


def _gaussian(shape=(256, 192), seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_nf4_table_matches_spec_and_quantile_construction():
    torch.testing.assert_close(NF4_CODE, torch.tensor(SPEC_VALUES), atol=1e-6, rtol=0)
    torch.testing.assert_close(nf4_code_from_quantiles().float(), NF4_CODE, atol=1e-6, rtol=0)
    assert torch.all(NF4_CODE[1:] > NF4_CODE[:-1])
    assert (NF4_CODE == 0).sum() == 1 and NF4_CODE.min() == -1 and NF4_CODE.max() == 1


def test_dynamic_map_shape_and_density():
    code = dynamic_map_8bit()
    assert code.numel() == 256 and torch.all(code[1:] >= code[:-1])
    assert code.max() == 1.0 and (code == 0).sum() == 1
    assert code.min() > -1.0  # signed map has +1 but not -1 (bitsandbytes' layout)
    assert (code.abs() < 1e-3).sum() > 20  # dense near 0: the point of a dynamic map


def test_round_trip_values_lie_in_code_set_times_absmax():
    w = _gaussian((100, 70))  # 7000 = 109 blocks of 64 plus 24: a partial last block
    q = quantize_nf4(w, double_quant=False)
    deq = dequantize_nf4(q).reshape(-1)
    absmax = torch.nn.functional.pad(w.reshape(-1), (0, (-w.numel()) % 64)).view(-1, 64).abs().amax(1)
    torch.testing.assert_close(q.absmax, absmax)
    per_elem = absmax.repeat_interleave(64)[: w.numel()]
    ratio = deq / per_elem
    dist = (ratio[:, None] - NF4_CODE[None, :]).abs().min(dim=1).values
    assert dist.max() < 1e-6
    # nearest code: no other code is closer to w / absmax than the chosen one
    target = w.reshape(-1) / per_elem
    best = (target[:, None] - NF4_CODE[None, :]).abs().min(dim=1).values
    assert torch.all((target - ratio).abs() <= best + 1e-6)


def _int4_absmax_error(w: torch.Tensor, block: int = 64) -> float:
    """Uniform symmetric 4-bit baseline: q = round(w / absmax * 7) in [-8, 7]."""
    blocks = w.reshape(-1, block)
    absmax = blocks.abs().amax(1, keepdim=True)
    q = torch.clamp(torch.round(blocks / absmax * 7), -8, 7)
    return (q * absmax / 7 - blocks).abs().mean().item()


def test_nf4_beats_int4_absmax_on_gaussian_data():
    w = _gaussian()
    nf4 = (dequantize_nf4(quantize_nf4(w, double_quant=False)) - w).abs().mean().item()
    assert nf4 < _int4_absmax_error(w)


def test_double_quantisation_error_bound():
    w = _gaussian((512, 256))
    q = quantize_nf4(w, double_quant=True)
    plain = quantize_nf4(w, double_quant=False)
    code = dynamic_map_8bit()
    half_gap = ((code[1:] - code[:-1]).max() / 2).item()
    # each 256-block of centred absmax has scale s = max |absmax - offset|; error <= s * half_gap
    centred = plain.absmax - plain.absmax.mean()
    s = torch.nn.functional.pad(centred, (0, (-centred.numel()) % 256)).view(-1, 256).abs().amax(1)
    bound = s.repeat_interleave(256)[: centred.numel()] * half_gap + 1e-6
    assert torch.all((q.scales() - plain.absmax).abs() <= bound)
    assert q.absmax.dtype == torch.uint8 and q.absmax_scale.numel() == -(-q.absmax.numel() // 256)
    err_dq = (dequantize_nf4(q) - w).abs().mean().item()
    err_plain = (dequantize_nf4(plain) - w).abs().mean().item()
    assert err_dq <= err_plain * 1.01 + 1e-6


def test_pack_unpack_round_trip_and_nibble_order():
    idx = torch.tensor([1, 2, 15, 0, 7], dtype=torch.uint8)
    packed = pack_4bit(idx)
    assert packed.tolist() == [0x12, 0xF0, 0x70]
    assert torch.equal(unpack_4bit(packed, 5), idx)


def test_memory_at_most_03x_bf16_including_scales():
    for shape in [(576, 1536), (1536, 576), (64, 128)]:
        lin = nn.Linear(shape[1], shape[0], bias=False)
        q = NF4Linear.from_linear(lin)
        assert q.weight_nbytes() <= 0.3 * lin.weight.numel() * 2
        q_plain = NF4Linear.from_linear(lin, double_quant=False)
        assert q.weight_nbytes() < q_plain.weight_nbytes() <= 0.3 * lin.weight.numel() * 2


def test_qlora_layer_equals_lora_on_dequantised_weight():
    torch.manual_seed(0)
    lin = nn.Linear(96, 80)
    nf4 = NF4Linear.from_linear(lin, compute_dtype=torch.float32)
    deq = nn.Linear(96, 80)
    with torch.no_grad():
        deq.weight.copy_(nf4.dequantize(torch.float32))
        deq.bias.copy_(lin.bias)
    a, b = LoRALinear(deq, 8, 16), LoRALinear(nn.Linear(96, 80), 8, 16)
    b.base = nf4
    with torch.no_grad():
        a.lora_B.weight.normal_()
        b.lora_A.weight.copy_(a.lora_A.weight)
        b.lora_B.weight.copy_(a.lora_B.weight)
    x = torch.randn(5, 96, requires_grad=True)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(yb, ya, atol=1e-5, rtol=0)
    gx = torch.autograd.grad(yb.sum(), x)[0]
    torch.testing.assert_close(gx, torch.autograd.grad(ya.sum(), x)[0], atol=1e-5, rtol=0)


def test_bf16_compute_runs_and_is_close():
    lin = nn.Linear(64, 64)
    q = NF4Linear.from_linear(lin)  # default bf16 compute
    x = torch.randn(3, 64)
    out = q(x)
    assert out.dtype == torch.float32
    ref = nn.functional.linear(x, q.dequantize(torch.float32), lin.bias)
    assert (out - ref).abs().max() < 0.05


def test_qlora_quantises_adapted_linears_and_merge_requantise_warns_with_bounded_drift():
    ids = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    spec = MethodSpec("qlora", rank=4, alpha=8, options={"compute_dtype": "float32", "merge_requantize": True})
    adapted = apply_methods(tiny_model(0), spec)
    layers = [m for m in adapted.methods[0].delta_modules(adapted.model)]
    assert len(layers) == 14 and all(isinstance(m.base, NF4Linear) for m in layers)
    with torch.no_grad():
        for _, p in adapted.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.02)
        unmerged = adapted.model(ids).logits
        with pytest.warns(UserWarning, match="requantising"):
            adapted.merge()
        assert all(isinstance(m.base, NF4Linear) for m in layers)
        merged = adapted.model(ids).logits
    drift = (merged - unmerged).abs().max().item()
    assert 0 < drift < 0.1 * unmerged.abs().max().item()


def test_bad_quant_options_are_config_errors():
    from deltatune.errors import ConfigError

    with pytest.raises(ConfigError, match="compute_dtype"):
        apply_methods(tiny_model(0), MethodSpec("qlora", options={"compute_dtype": "int8"}))
    with pytest.raises(ConfigError, match="unknown option"):
        apply_methods(tiny_model(0), MethodSpec("qlora", options={"blocksize": 64}))


def test_matches_bitsandbytes_when_installed():
    """Same map, same 4-bit codes; absmax codes agree except where bitsandbytes' native CPU kernel does
    not pick the nearest 8-bit code (ours does, like its pure-PyTorch default backend). Rows are a
    multiple of the block: bitsandbytes 0.50.2's native CPU dequantiser is wrong otherwise
    (docs/methods-notes.md)."""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    torch.testing.assert_close(bnb_f.create_dynamic_map(signed=True), dynamic_map_8bit(), atol=0, rtol=0)
    w = _gaussian((576, 1536))
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = quantize_nf4(w, double_quant=False)
    assert torch.equal(packed.reshape(-1), ours.packed)
    torch.testing.assert_close(dequantize_nf4(ours), bnb_f.dequantize_4bit(packed, state), atol=0, rtol=0)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(w, double_quant=True)
    assert torch.equal(state.offset, ours.absmax_offset) and torch.equal(state.state2.absmax, ours.absmax_scale)
    assert (state.absmax != ours.absmax).float().mean() < 0.01
    err_ours = (dequantize_nf4(ours) - w).abs().mean()
    err_bnb = (bnb_f.dequantize_4bit(packed, state) - w).abs().mean()
    assert err_ours <= err_bnb + 1e-7


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_the_dequantised_weight_is_not_kept_for_backward_and_gradients_are_unchanged(x_dtype):
    """QLoRA's saving: between forward and backward only the 4-bit codes stay; F.linear on the dequantised
    weight kept that whole (out x in) weight per layer. The input's gradient is what F.linear gives, bitwise."""
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(96, 160), compute_dtype=torch.bfloat16)
    x = torch.randn(3, 5, 96, dtype=x_dtype, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((t.numel(), t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    assert all(n != 96 * 160 for n, _ in saved)
    assert sum(b for _, b in saved) <= 0.3 * 96 * 160 * 2  # codes (half a byte each) and scales: < 0.3x bf16
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    x_ref = x.detach().clone().requires_grad_(True)
    bias = layer.bias.to(torch.bfloat16)
    ref = torch.nn.functional.linear(x_ref.to(torch.bfloat16), layer.dequantize(torch.bfloat16), bias).to(x_dtype)
    (gx_ref,) = torch.autograd.grad(ref, x_ref, g)
    assert torch.equal(out, ref) and torch.equal(gx, gx_ref)
