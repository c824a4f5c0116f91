"""DoRA: magnitude init and merge norms, the detach trick against a hand-worked gradient, PEFT's DoRA
(same weights -> same logits) and PEFT-format export both ways."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltatune.methods.apply import apply_methods, load_adapter
from deltatune.methods.base import MethodSpec
from deltatune.methods.dora import DoRALinear
from deltatune.methods.dropout import Dropout
from deltatune.testing import tiny_model

peft = pytest.importorskip("peft")

IDS = torch.randint(3, 512, (2, 11), generator=torch.Generator().manual_seed(0))


def _ours_random(seed: int = 1, **spec_kw):
    adapted = apply_methods(tiny_model(0), MethodSpec("dora", rank=4, alpha=8, **spec_kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapted.trainable_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g) * (p.abs().mean() if "magnitude" in name else 1))
    return adapted


def test_magnitude_is_row_norm_at_init_and_merged_row_norms_equal_m():
    base = tiny_model(0)
    adapted = apply_methods(tiny_model(0), MethodSpec("dora", rank=4, alpha=8))
    layers = adapted.methods[0].named_delta_modules(adapted.model)
    assert len(layers) == 14
    for name, layer in layers:
        w0 = base.get_submodule(name).weight
        torch.testing.assert_close(layer.lora_magnitude_vector, w0.norm(dim=1), atol=1e-6, rtol=0)
    adapted = _ours_random()
    adapted.merge()
    for _, layer in adapted.methods[0].named_delta_modules(adapted.model):
        torch.testing.assert_close(layer.base.weight.norm(dim=1), layer.lora_magnitude_vector, atol=1e-5, rtol=1e-6)


def _toy(exact: bool) -> DoRALinear:
    """A 2 -> 3 layer (W0 is 3x2), rank 1, alpha 1 (s = 1), in float64, with hand-picked values."""
    lin = nn.Linear(2, 3, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 1.0]]))
        lin.bias.copy_(torch.tensor([0.5, -0.5, 1.0]))
    layer = DoRALinear(lin, 1, 1.0, exact_grad=exact, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.tensor([[0.5, -1.0]]))
        layer.lora_B.weight.copy_(torch.tensor([[1.0], [2.0], [-1.0]]))
        layer.lora_magnitude_vector.copy_(torch.tensor([2.0, 1.0, 3.0]))
    return layer


def test_detach_trick_gradient_matches_hand_computation():
    layer = _toy(exact=False)
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    g = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)  # loss = g . y
    (layer(x)[0] @ g).backward()
    # by hand: V = W0 + B A = [[1.5, 1], [1, -3], [2.5, 2]]; n = (sqrt(3.25), sqrt(10), sqrt(10.25))
    V = torch.tensor([[1.5, 1.0], [1.0, -3.0], [2.5, 2.0]], dtype=torch.float64)
    n = torch.tensor([3.25, 10.0, 10.25], dtype=torch.float64).sqrt()
    m = torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64)
    Vx = torch.tensor([-0.5, 7.0, -1.5], dtype=torch.float64)  # V @ [1, -2]
    Ax = torch.tensor([2.5], dtype=torch.float64)  # A @ [1, -2]
    gs = g * m / n  # dL/d(V x) with n held constant
    torch.testing.assert_close(V @ x[0], Vx)
    torch.testing.assert_close(layer.lora_magnitude_vector.grad, g * Vx / n)
    torch.testing.assert_close(layer.lora_B.weight.grad, gs[:, None] * Ax[None, :])
    torch.testing.assert_close(layer.lora_A.weight.grad, (layer.lora_B.weight.detach().T @ gs)[:, None] * x)
    # and y itself: b + (m / n) V x
    torch.testing.assert_close(layer(x)[0].detach(), layer.base.bias.detach() + m / n * Vx)


def test_exact_gradient_flag_backpropagates_through_the_norm():
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    g = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    exact, detached = _toy(exact=True), _toy(exact=False)
    (exact(x)[0] @ g).backward()
    (detached(x)[0] @ g).backward()
    A = exact.lora_A.weight.detach().clone().requires_grad_(True)
    B = exact.lora_B.weight.detach().clone().requires_grad_(True)
    m = exact.lora_magnitude_vector.detach()
    V = exact.base.weight.detach() + B @ A  # W' = m V / ||V|| with autograd through ||V||
    y = exact.base.bias.detach() + (m / V.norm(dim=1))[:, None] * V @ x[0]
    gA, gB = torch.autograd.grad(y @ g, (A, B))
    torch.testing.assert_close(exact.lora_A.weight.grad, gA)
    torch.testing.assert_close(exact.lora_B.weight.grad, gB)
    assert not torch.allclose(detached.lora_B.weight.grad, gB)  # the flag changes something
    torch.testing.assert_close(exact.lora_magnitude_vector.grad, detached.lora_magnitude_vector.grad)


def test_delta_weight_equals_basis_pushforward():
    layer = _toy(exact=False)
    eye = torch.eye(2, dtype=torch.float64)
    pushed = (layer(eye) - layer.base(eye)).T
    torch.testing.assert_close(layer.delta_weight().double(), pushed, atol=1e-6, rtol=0)


def _peft_dora():
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, task_type="CAUSAL_LM")
    return peft.get_peft_model(tiny_model(0), cfg)


def test_same_weights_give_peft_dora_logits():
    ours = _ours_random()
    theirs = _peft_dora()
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.trainable_parameters():
            module, _, leaf = name.rpartition(".")
            if leaf == "lora_magnitude_vector":
                key = f"base_model.model.{name}.default.weight"
            else:  # "...lora_A.weight"
                module, _, sub = module.rpartition(".")
                key = f"base_model.model.{module}.{sub}.default.{leaf}"
            params[key].copy_(p)
    theirs.eval()
    with torch.no_grad():
        expected = theirs(IDS).logits
        got = ours.model(IDS).logits
    assert (expected - tiny_model(0)(IDS).logits).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_peft_loads_our_export_and_we_load_peft_dora(tmp_path):
    ours = _ours_random()
    with torch.no_grad():
        expected = ours.model(IDS).logits
    ours.save_adapter(tmp_path / "ours")
    assert "lora_magnitude_vector" in (tmp_path / "ours" / "adapter_model.safetensors").read_bytes().decode("latin1")
    loaded = peft.PeftModel.from_pretrained(tiny_model(0), str(tmp_path / "ours"))
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, expected, atol=1e-5, rtol=0)
    back = load_adapter(tiny_model(0), tmp_path / "ours")
    assert back.methods[0].name == "dora"
    with torch.no_grad():
        assert torch.equal(back.model(IDS).logits, expected)
    loaded.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        again = load_adapter(tiny_model(0), tmp_path / "peft").model(IDS).logits
    torch.testing.assert_close(again, expected, atol=1e-6, rtol=0)


def test_quantised_base_is_saved_in_deltatune_format(tmp_path):
    adapted = apply_methods(tiny_model(0), MethodSpec("dora", targets="q_proj", options={"quantize_base": True}))
    assert not adapted.is_peft_method
    adapted.save_adapter(tmp_path / "a")
    assert (tmp_path / "a" / "deltatune_adapter.json").exists()


def _random_dora_layer(dtype=torch.float64, bias=True, seed=3):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(24, 20, bias=bias).to(dtype)
    layer = DoRALinear(base, r=4, alpha=8)
    with torch.no_grad():
        for p in (layer.lora_A.weight, layer.lora_B.weight):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        layer.lora_magnitude_vector.mul_(1 + 0.3 * torch.rand(20, generator=g, dtype=torch.float64).to(dtype))
    return layer, g


def test_expanded_norm_equals_the_direct_row_norm_and_follows_the_base_weight():
    layer, _ = _random_dora_layer()
    direct = lambda: (layer.base.weight + layer._lora_weight()).norm(dim=1)  # noqa: E731
    assert torch.allclose(layer.weight_norm(), direct(), rtol=1e-12)
    layer.merge()  # rewrites W0 in place: the cached ||W0||^2 must not be reused
    layer.unmerge()
    with torch.no_grad():
        layer.base.weight.mul_(1.5)
    assert torch.allclose(layer.weight_norm(), direct(), rtol=1e-12)


def test_bf16_autocast_forward_matches_the_float64_formula():
    layer64, g = _random_dora_layer()
    x = torch.randn(2, 7, 24, generator=g, dtype=torch.float64)
    ref = layer64(x)  # the fp64 path: base(x) + (m/n - 1) W0 x + (m/n) s B A x
    w, b = layer64.base.weight, layer64.base.bias
    m, n = layer64.lora_magnitude_vector, (w + layer64._lora_weight()).norm(dim=1)
    assert torch.allclose(ref, (m / n) * (x @ (w + layer64._lora_weight()).T) + b, atol=1e-10)
    base16 = nn.Linear(24, 20).to(torch.bfloat16)
    with torch.no_grad():
        base16.weight.copy_(w)
        base16.bias.copy_(b)
    layer16 = DoRALinear(base16, r=4, alpha=8)  # adapters in fp32 as deltatune trains them
    with torch.no_grad():
        layer16.lora_A.weight.copy_(layer64.lora_A.weight)
        layer16.lora_B.weight.copy_(layer64.lora_B.weight)
        layer16.lora_magnitude_vector.copy_(layer64.lora_magnitude_vector)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer16(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    # bf16 rounding of the weights, inputs and outputs only
    assert (out.double() - ref).abs().max() < 0.03 * ref.abs().max()


def _saved_token_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in tensors with one row per token (activations, not weights)."""
    tokens, seen, total = x.shape[0] * x.shape[1], set(), 0

    def pack(t: torch.Tensor):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
        if t.dim() >= 2 and t.shape[:-1].numel() == tokens and key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    return total


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dora_keeps_one_output_sized_tensor_more_than_lora_for_backward(dtype):
    """The magnitude's gradient needs W0 x + s B A x, once, in the working dtype (bf16 under autocast), with
    dropout on: the earlier form kept (m/n - 1) W0 x and s B A x apart, in fp32 (13.6 GB on the 135M model)."""
    from deltatune.methods.lora import LoRALinear

    torch.manual_seed(0)
    base = nn.Linear(64, 96, bias=False).to(dtype)
    x = torch.randn(4, 32, 64, dtype=dtype)
    saved = {}
    for name, cls in (("lora", LoRALinear), ("dora", DoRALinear)):
        layer = cls(base, 8, 16, dropout=0.1, dtype=torch.float32)  # fp32 adapters, as deltatune trains them
        nn.init.normal_(layer.lora_B.weight)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            saved[name] = _saved_token_bytes(layer, x)
        assert layer.lora_B.weight.grad is not None
    extra = saved["dora"] - saved["lora"]
    assert extra == 4 * 32 * 96 * dtype.itemsize, saved
    assert layer.activation_numel_per_token() - LoRALinear(base, 8, 16, dropout=0.1).activation_numel_per_token() == 96


def test_bf16_autocast_with_dropout_matches_the_float64_formula_and_its_gradients():
    """Training's path (autocast, dropout on): output and the gradients of m, A and B against float64 with
    the same dropout mask (the mask depends on the seed and the shape only)."""
    layer64, g = _random_dora_layer(bias=False)
    layer64.lora_dropout = Dropout(0.25)
    x = torch.randn(2, 7, 24, generator=g, dtype=torch.float64)
    base16 = nn.Linear(24, 20, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        base16.weight.copy_(layer64.base.weight)
    layer16 = DoRALinear(base16, r=4, alpha=8, dropout=0.25, dtype=torch.float32)
    with torch.no_grad():
        for name, p in layer16.named_parameters():
            if p.requires_grad:
                p.copy_(layer64.get_parameter(name))
    torch.manual_seed(5)
    ref = layer64(x)
    ref.square().sum().backward()
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer16(x.to(torch.bfloat16))
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max() < 0.03 * ref.abs().max()
    for name in ("lora_magnitude_vector", "lora_A.weight", "lora_B.weight"):
        want, got = layer64.get_parameter(name).grad, layer16.get_parameter(name).grad.double()
        assert (got - want).norm() < 0.05 * want.norm(), name
