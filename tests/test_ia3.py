"""(IA)3 against PEFT's IA3 (same vectors -> same logits), PEFT-format export both ways, and the layer maths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.methods.apply import apply_methods, load_adapter
from deltatune.methods.base import MethodSpec
from deltatune.methods.ia3 import IA3Linear
from deltatune.testing import tiny_model

peft = pytest.importorskip("peft")

IDS = torch.randint(3, 512, (2, 11), generator=torch.Generator().manual_seed(0))


def _ours_random(seed: int = 1):
    adapted = apply_methods(tiny_model(0), MethodSpec("ia3"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapted.trainable_parameters():
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return adapted


def _peft_model():
    cfg = peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"
    )
    return peft.get_peft_model(tiny_model(0), cfg)


def test_same_vectors_give_peft_logits():
    ours = _ours_random()
    theirs = _peft_model()
    theirs_params = dict(theirs.named_parameters())
    n = 0
    with torch.no_grad():
        for name, p in ours.trainable_parameters():
            key = "base_model.model." + name + ".default"
            assert theirs_params[key].shape == p.shape
            theirs_params[key].copy_(p)
            n += 1
    assert n == len([k for k in theirs_params if "ia3_l" in k]) == 6
    theirs.eval()
    with torch.no_grad():
        expected = theirs(IDS).logits
        got = ours.model(IDS).logits
    assert (expected - tiny_model(0)(IDS).logits).abs().max() > 1e-2  # the vectors matter
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_peft_loads_our_export_and_we_load_it_back(tmp_path):
    ours = _ours_random()
    with torch.no_grad():
        expected = ours.model(IDS).logits
    ours.save_adapter(tmp_path / "a")
    loaded = peft.PeftModel.from_pretrained(tiny_model(0), str(tmp_path / "a"))
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, expected, atol=1e-5, rtol=0)
    back = load_adapter(tiny_model(0), tmp_path / "a")
    assert back.methods[0].name == "ia3" and back.methods[0].feedforward == ["down_proj"]
    with torch.no_grad():
        assert torch.equal(back.model(IDS).logits, expected)


def test_we_load_peft_saved_ia3(tmp_path):
    theirs = _peft_model()
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.2 * torch.randn(p.shape))
    theirs.save_pretrained(str(tmp_path / "p"))
    theirs.eval()
    with torch.no_grad():
        expected = theirs(IDS).logits
        got = load_adapter(tiny_model(0), tmp_path / "p").model(IDS).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("feedforward", [False, True])
def test_layer_merge_scales_rows_or_columns_and_bias(feedforward):
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    layer = IA3Linear(lin, feedforward)
    with torch.no_grad():
        layer.ia3_l.copy_(torch.rand(layer.ia3_l.shape) + 0.5)
    l = layer.ia3_l.detach()  # noqa: E741
    x = torch.randn(3, 6)
    y = layer(x)
    if feedforward:  # input scaled: W diag(l) x + b
        torch.testing.assert_close(y, x * l @ w0.T + b0)
    else:  # output scaled, bias included: diag(l) (W x + b)
        torch.testing.assert_close(y, (x @ w0.T + b0) * l.T)
    eye = torch.eye(6)
    torch.testing.assert_close(
        layer.delta_weight(),
        (layer.adapted_forward(eye, lin(eye)) - lin(eye)).T
        if feedforward
        else (layer(eye) - lin(eye) - (l.T - 1) * b0).T,
        atol=1e-6,
        rtol=0,
    )
    layer.merge()
    torch.testing.assert_close(lin.weight, w0 * l)  # l is (1, in) for columns, (out, 1) for rows
    torch.testing.assert_close(lin.bias, b0 if feedforward else b0 * l.reshape(-1))
    torch.testing.assert_close(layer(x), y, atol=1e-6, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(lin.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(lin.bias, b0, atol=1e-6, rtol=0)


def test_defaults_and_bad_options():
    adapted = apply_methods(tiny_model(0), MethodSpec("ia3"))
    names = [n for n, _ in adapted.methods[0].named_delta_modules(adapted.model)]
    assert sorted({n.rsplit(".", 1)[-1] for n in names}) == ["down_proj", "k_proj", "v_proj"]
    with pytest.raises(ConfigError, match="unknown option 'ff' for method 'ia3'; valid options"):
        apply_methods(tiny_model(0), MethodSpec("ia3", options={"ff": ["down_proj"]}))
    with pytest.raises(ConfigError, match="match none"):
        apply_methods(tiny_model(0), MethodSpec("ia3", targets="k_proj", options={"feedforward_modules": ["up_proj"]}))
