"""Bottleneck adapters (Houlsby / Pfeiffer): identity at init, placement, count, math, training, round trip."""

import pytest
import torch

from deltatune.errors import ConfigError
from deltatune.methods.adapter import AdapterWrapped
from deltatune.methods.base import MethodSpec, get_method
from deltatune.methods.inject import freeze
from deltatune.testing import tiny_model

IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 11, 40], [1, 7, 8, 100, 200, 300, 2, 2]])


def adapt(model, **options):
    freeze(model)
    method = get_method("adapter")(MethodSpec(name="adapter", options=options))
    method.apply(model)
    return method


def randomise(method, model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in method.trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer"])
def test_identity_at_init(variant):
    base, model = tiny_model(0), tiny_model(0)
    adapt(model, variant=variant, bottleneck=8)
    torch.testing.assert_close(model(IDS).logits, base(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "variant,sites", [("houlsby", {"self_attn.o_proj", "mlp.down_proj"}), ("pfeiffer", {"mlp.down_proj"})]
)
def test_placement_and_parameter_count(variant, sites):
    model = tiny_model(0)
    m, d, L = 8, model.config.hidden_size, model.config.num_hidden_layers
    method = adapt(model, variant=variant, bottleneck=m)
    wrapped = {n for n, mod in model.named_modules() if isinstance(mod, AdapterWrapped)}
    assert wrapped == {f"model.layers.{i}.{s}" for i in range(L) for s in sites}
    per_adapter = 2 * m * d + m + d  # W_down (m x d) + b_down (m) + W_up (d x m) + b_up (d)
    norms = (2 * L + 1) * d if variant == "houlsby" else 0  # Houlsby also trains every RMSNorm weight (d each)
    assert sum(p.numel() for _, p in method.trainable_parameters(model)) == len(sites) * L * per_adapter + norms
    assert {n for n, p in model.named_parameters() if p.requires_grad} == dict(
        method.trainable_parameters(model)
    ).keys()


@pytest.mark.parametrize(
    "act,ref", [("relu", torch.relu), ("gelu", torch.nn.functional.gelu), ("silu", torch.nn.functional.silu)]
)
def test_adapter_math_against_float64(act, ref):
    model = tiny_model(0)
    method = adapt(model, variant="pfeiffer", bottleneck=4, nonlinearity=act)
    randomise(method, model)
    wrapped = model.model.layers[1].mlp.down_proj
    x = torch.randn(3, model.config.intermediate_size)
    a = wrapped.adapter
    h = x.double() @ wrapped.base.weight.double().T
    z = ref(h @ a.down_weight.double().T + a.down_bias.double())
    expected = h + z @ a.up_weight.double().T + a.up_bias.double()
    torch.testing.assert_close(wrapped(x).double(), expected, rtol=0, atol=1e-5)


def test_training_lowers_loss_and_base_stays_frozen():
    model = tiny_model(0)
    method = adapt(model, variant="houlsby", bottleneck=8)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam([p for _, p in method.trainable_parameters(model)], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_save_load_round_trip():
    model = tiny_model(0)
    method = adapt(model, variant="houlsby", bottleneck=8, nonlinearity="gelu")
    randomise(method, model)
    state = method.state_dict(model)
    assert len(state) == 4 * 2 * 2 + 2 * 2 + 1  # 4 tensors per adapter, 2 adapters per layer, 2 layers; 5 norms
    fresh = tiny_model(0)
    adapt(fresh, variant="houlsby", bottleneck=8, nonlinearity="gelu")
    _, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected
    torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits, rtol=0, atol=0)
    assert not torch.allclose(model(IDS).logits, tiny_model(0)(IDS).logits)


def test_houlsby_trains_norms_by_default_and_option_turns_them_off():
    model = tiny_model(0)
    with_norms = {n for n, _ in adapt(model, variant="houlsby").trainable_parameters(model)}
    assert "model.layers.0.input_layernorm.weight" in with_norms and "model.norm.weight" in with_norms
    for variant, train_norms in (("houlsby", False), ("pfeiffer", None)):
        model = tiny_model(0)
        method = adapt(model, variant=variant, **({} if train_norms is None else {"train_norms": train_norms}))
        assert not any("norm" in n for n, _ in method.trainable_parameters(model))


def test_merge_says_why_not():
    model = tiny_model(0)
    method = adapt(model)
    with pytest.raises(ConfigError, match="cannot be merged: .*nonlinearity"):
        method.merge(model)


@pytest.mark.parametrize(
    "options,field",
    [
        ({"variant": "lora"}, "variant"),
        ({"nonlinearity": "tanh"}, "nonlinearity"),
        ({"bottleneck": 0}, "bottleneck"),
        ({"size": 3}, "unknown option 'size'.*valid options: .*bottleneck"),
    ],
)
def test_bad_options_are_config_errors(options, field):
    with pytest.raises(ConfigError, match=field):
        get_method("adapter")(MethodSpec(name="adapter", options=options))
