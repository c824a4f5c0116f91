"""The adapters' CPU dropout: dropout's distribution, its exact values and gradient, reproducible draws."""

from __future__ import annotations

import math

import pytest
import torch

from deltatune.methods.apply import apply_methods
from deltatune.methods.base import MethodSpec
from deltatune.methods.dropout import Dropout, dropped_lanes, keep_mask, kept
from deltatune.testing import tiny_model


def test_drop_rate_is_p_in_every_lane_of_the_random_words():
    """Each 64-bit word feeds four consecutive elements: every lane (position mod 4) must drop at rate p,
    including the top one (torch's random_() with no range leaves the top bit 0: that lane would keep all)."""
    torch.manual_seed(0)
    n = 1 << 20
    keep, scale = keep_mask(torch.Size([n]), 0.05, torch.device("cpu"))
    p_used = round(0.05 * 65536) / 65536
    assert scale == pytest.approx(1 / (1 - p_used), rel=1e-12)
    sd = math.sqrt(p_used * (1 - p_used) / (n // 4))
    for lane in range(4):
        dropped = 1 - keep[lane::4].double().mean().item()
        assert abs(dropped - p_used) < 5 * sd, (lane, dropped)


@pytest.mark.parametrize("p", [0.1, 0.5, 1e-6])
def test_drop_rate_follows_p(p):
    torch.manual_seed(1)
    keep, scale = keep_mask(torch.Size([512, 1024]), p, torch.device("cpu"))
    p_used = round(p * 65536) / 65536
    n = keep.numel()
    sd = math.sqrt(max(p_used * (1 - p_used), 1e-12) / n)
    assert abs((1 - keep.double().mean().item()) - p_used) <= 5 * sd
    assert scale * (1 - p_used) == pytest.approx(1.0)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 1e-6, 0.99999])
def test_exactly_round_p_times_65536_lane_values_drop(p):
    """Over every value an int16 lane can take, the threshold keeps exactly 65536 - round(p * 65536)."""
    every_lane = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    assert kept(every_lane, dropped_lanes(p)).sum().item() == 65536 - min(round(p * 65536), 65535)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_kept_values_are_x_times_scale_and_the_gradient_is_the_same_mask(dtype):
    torch.manual_seed(2)
    x = torch.randn(37, 53, dtype=dtype).requires_grad_()  # an odd size: the last word is partly used
    drop = Dropout(0.05).train()
    torch.manual_seed(3)
    out = drop(x)
    torch.manual_seed(3)
    keep, scale = keep_mask(x.shape, 0.05, x.device)
    zero = torch.zeros((), dtype=dtype)
    assert out.dtype == dtype
    assert torch.equal(out, torch.where(keep, x.detach() * scale, zero))
    assert 0 < (~keep).sum() < keep.numel()
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.equal(x.grad, torch.where(keep, grad * scale, zero))


def test_non_contiguous_input_without_grad():
    torch.manual_seed(5)
    x = torch.randn(48, 40).t()  # a transposed view
    torch.manual_seed(6)
    out = Dropout(0.3).train()(x)
    torch.manual_seed(6)
    keep, scale = keep_mask(x.shape, 0.3, x.device)
    assert not out.requires_grad
    assert torch.equal(out, torch.where(keep, x * scale, torch.zeros(())))


def test_seeded_draws_repeat_and_successive_calls_differ():
    drop = Dropout(0.3).train()
    x = torch.ones(64, 64)
    torch.manual_seed(7)
    a, b = drop(x), drop(x)
    torch.manual_seed(7)
    assert torch.equal(drop(x), a)
    assert not torch.equal(a, b)


def test_eval_mode_and_zero_p_are_the_identity():
    x = torch.randn(8, 8)
    assert Dropout(0.5).eval()(x) is x
    assert Dropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Dropout(1.0)


def test_output_is_unbiased():
    torch.manual_seed(4)
    x = torch.full((1 << 20,), 3.0, dtype=torch.float64)
    mean = Dropout(0.05).train()(x).mean().item()
    sd = 3.0 * math.sqrt(0.05 / 0.95 / x.numel())
    assert abs(mean - 3.0) < 5 * sd


@pytest.mark.parametrize("method", ["lora", "dora", "mora", "vera"])
def test_adapters_with_dropout_use_it_and_drop_in_training_only(method):
    model = tiny_model()
    adapted = apply_methods(model, [MethodSpec(name=method, targets="all-linear", rank=4, dropout=0.1)])
    drops = [m for m in adapted.model.modules() if isinstance(m, Dropout)]
    assert drops and all(d.p == 0.1 for d in drops)
    with torch.no_grad():  # B starts at zero: give the adapters a delta, so that dropping inputs shows
        for _, p in adapted.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        adapted.model.train()
        assert not torch.equal(adapted.model(ids).logits, adapted.model(ids).logits)
        adapted.model.eval()
        assert torch.equal(adapted.model(ids).logits, adapted.model(ids).logits)
