"""Sparse upcycling: what holds exactly at the start, routing counts, parameter counts, aux loss."""

import math

import pytest
import torch

from deltatune.errors import UserError
from deltatune.testing import tiny_model
from deltatune.upcycle.convert import UpcycleSpec, count_parameters, parse_layers, spec_of, upcycle
from deltatune.upcycle.losses import RouterLosses, balance_loss
from deltatune.upcycle.moe import MoEBlock


def _ids(n=2, t=24, seed=1):
    return torch.randint(0, 512, (n, t), generator=torch.Generator().manual_seed(seed))


def _block(router="topk", k=2, capacity=None, normalize=False, experts=4, hidden=8, seed=0):
    torch.manual_seed(seed)
    ex = [torch.nn.Linear(hidden, hidden, bias=False).double() for _ in range(experts)]
    block = MoEBlock(ex, hidden, router=router, k=k, capacity=capacity, normalize=normalize).double()
    return block


def test_renormalised_topk_identical_experts_gives_dense_logits():
    dense = tiny_model(num_hidden_layers=4).double()
    ids = _ids()
    with torch.no_grad():
        ref = dense(ids).logits
    moe = upcycle(dense, UpcycleSpec(experts=4, router="topk", k=2, normalize=True, layers=parse_layers("all", 4)))
    with torch.no_grad():
        out = moe(ids).logits
    assert (out - ref).abs().max() < 1e-10  # weights sum to 1: only float64 rounding differs


def test_raw_softmax_scales_mlp_output_by_topk_probability_mass():
    model = tiny_model(num_hidden_layers=2).double()
    mlp = model.model.layers[1].mlp
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    with torch.no_grad():
        dense_out = mlp(x)
    upcycle(model, UpcycleSpec(experts=8, k=2, layers=[1]))
    block = model.model.layers[1].mlp
    with torch.no_grad():
        out = block(x)
        probs = torch.softmax(block.router(x), dim=-1)
        mass = probs.topk(2, dim=-1).values.sum(-1, keepdim=True)
    assert torch.allclose(out, mass * dense_out, rtol=0, atol=1e-12)
    assert (mass < 1).all() and (mass > 2 / 8).all()  # strictly between k/E and 1


def test_parameter_count_formula():
    dense = tiny_model(num_hidden_layers=4)
    n_dense = sum(p.numel() for p in dense.parameters())
    mlp = sum(p.numel() for p in dense.model.layers[0].mlp.parameters())
    e, layers = 8, parse_layers("every-other", 4)
    assert layers == [1, 3]
    moe = upcycle(dense, UpcycleSpec(experts=e, layers=layers))
    counts = count_parameters(moe)
    assert counts["total"] == n_dense + (e - 1) * mlp * len(layers) + e * 64 * len(layers)
    assert counts["router"] == e * 64 * len(layers)
    assert counts["active_per_token"] == n_dense + (2 - 1) * mlp * len(layers) + e * 64 * len(layers)
    assert spec_of(moe) == UpcycleSpec(experts=8, layers=[1, 3], router="topk", k=2)


def test_router_init_normal_002_no_bias_and_experts_are_copies():
    moe = upcycle(tiny_model(num_hidden_layers=2), UpcycleSpec(experts=32, layers=[0, 1]), seed=3)
    block = moe.model.layers[0].mlp
    assert block.router.bias is None
    assert abs(block.router.weight.std().item() - 0.02) < 0.002
    for ex in block.experts[1:]:
        assert torch.equal(ex.gate_proj.weight, block.experts[0].gate_proj.weight)
        assert ex.gate_proj.weight.data_ptr() != block.experts[0].gate_proj.weight.data_ptr()


def test_expert_choice_processes_exactly_T_tokens_per_expert():
    block = _block(router="expert-choice", capacity=2.0, experts=4)
    x = torch.randn(2, 15, 8, dtype=torch.float64)  # n = 30, T = ceil(2 * 30 / 4) = 15
    seen = []
    for e, ex in enumerate(block.experts):
        ex.register_forward_hook(lambda m, inp, out, e=e: seen.append((e, inp[0].shape[0])))
    block(x)
    assert seen == [(e, 15) for e in range(4)]
    r = block.last_routing
    assert r["processed"].tolist() == [15] * 4
    # the output is sum over experts that picked a token of p[t, e] * expert_e(x_t): check against a loop
    flat = x.reshape(-1, 8)
    p = torch.softmax(block.router(flat), dim=-1)
    ref = torch.zeros_like(flat)
    for e in range(4):
        top = p[:, e].topk(15).indices
        for t in top.tolist():
            ref[t] += p[t, e] * block.experts[e](flat[t])
    assert torch.allclose(block(x).reshape(-1, 8), ref, atol=1e-12)
    untouched = int(((p.topk(15, dim=0).indices.flatten()[None] == torch.arange(30)[:, None]).sum(1) == 0).sum())
    assert int(r["dropped"]) == untouched


def test_topk_capacity_drops_match_hand_count():
    block = _block(k=2, capacity=0.5, experts=4)  # n = 6: capacity ceil(0.5 * 2 * 6 / 4) = 2
    with torch.no_grad():
        block.router.weight.zero_()
        block.router.weight[0, 0] = 10.0  # feature 0 votes for expert 0, feature 1 for expert 1
        block.router.weight[1, 1] = 10.0
        block.router.weight[2, 2] = 5.0
    x = torch.zeros(6, 8, dtype=torch.float64)
    x[:, 0] = 1.0  # every token: first choice expert 0 ...
    x[:, 2] = 1.0  # ... second choice expert 2
    x[4:, 1] = 2.0  # tokens 4, 5: first choice expert 1, second expert 0
    block.train()
    out = block(x[None])[0]
    # first choices: e0 <- t0..t3 (keeps t0, t1; drops t2, t3), e1 <- t4, t5 (kept)
    # second choices: e2 <- t0..t3 (keeps t0, t1; drops t2, t3), e0 <- t4, t5 (e0 full: dropped)
    r = block.last_routing
    assert int(r["dropped"]) == 6
    assert r["processed"].tolist() == [2, 2, 2, 0]
    assert r["assigned"].tolist() == [6, 2, 4, 0]
    assert torch.equal(out[2], torch.zeros(8, dtype=torch.float64)) and torch.equal(out[3], out[2])
    block.eval()  # no drops at inference
    block(x[None])
    assert int(block.last_routing["dropped"]) == 0
    block.train()
    block.capacity = None
    block(x[None])
    assert int(block.last_routing["dropped"]) == 0


def test_balance_loss_is_one_for_uniform_routing_and_larger_when_skewed():
    e, n = 8, 64
    assert balance_loss(torch.zeros(n, e), torch.full((e,), n * 2 // e)).item() == pytest.approx(1.0, abs=1e-7)
    logits = torch.zeros(n, e)
    logits[:, 0] = 5.0
    assigned = torch.tensor([n, n] + [0] * (e - 2))
    p0 = math.exp(5) / (math.exp(5) + e - 1)
    expected = e * (0.5 * p0 + 0.5 * (1 - p0) / (e - 1))
    assert balance_loss(logits, assigned).item() == pytest.approx(expected, rel=1e-6)


def test_balance_loss_of_float64_routing_is_exact_in_float64():
    """The assigned fractions were rounded to float32 before the float64 product: with 3 experts (1/3 is not a
    float32) the loss was 4.5e-8 off the formula, and 'expert choice's constant 1' read 1.0000000298."""
    logits = torch.tensor([[0.3, -1.2, 2.0], [1.0, 0.5, -0.7], [-0.2, 0.9, 0.4]], dtype=torch.float64)
    assigned = torch.tensor([2, 0, 1])
    probs = torch.softmax(logits, dim=-1)
    expected = 3 * sum((assigned[e].item() / 3) * probs[:, e].mean().item() for e in range(3))
    assert balance_loss(logits, assigned).item() == pytest.approx(expected, abs=1e-15)


def test_router_losses_collects_gradients_and_metrics():
    model = upcycle(tiny_model(num_hidden_layers=2), UpcycleSpec(experts=4, layers=[0, 1], capacity=1.0))
    model.train()
    losses = RouterLosses(model, aux_weight=0.01, z_weight=0.001)
    model(_ids())
    aux = losses.collect()
    aux.backward()
    assert model.model.layers[0].mlp.router.weight.grad.abs().sum() > 0
    m = losses.summary()
    assert len(m["expert_load"]) == 2 and all(abs(sum(ld) - 1) < 1e-3 for ld in m["expert_load"])
    assert 0 < m["router_entropy"] <= math.log(4) + 1e-6 and m["moe_aux_loss"] >= 1 - 1e-6
    assert m["moe_dropped"] >= 0 and losses.summary() == {}


def test_layer_choices_and_bad_input():
    assert parse_layers("last:2", 6) == [4, 5]
    assert parse_layers("0,3,3", 6) == [0, 3]
    assert parse_layers("all", 3) == [0, 1, 2]
    for bad in ("7", "last:0", "odd", ""):
        with pytest.raises(UserError):
            parse_layers(bad, 6)
    with pytest.raises(UserError, match="k must be"):
        upcycle(tiny_model(), UpcycleSpec(experts=2, k=3))


@pytest.mark.parametrize(
    "spec,fmt",
    [
        (UpcycleSpec(experts=4, layers=[0, 1, 2, 3], normalize=True), "MixtralForCausalLM"),
        (UpcycleSpec(experts=4, layers=[0, 1, 2, 3]), "Qwen2MoeForCausalLM"),  # raw softmax: Mixtral can't
        (UpcycleSpec(experts=4, layers=[1, 3], normalize=True), "Qwen2MoeForCausalLM"),  # dense layers between
        (UpcycleSpec(experts=4, layers=[1, 3], router="expert-choice"), None),  # deltatune's own format
    ],
)
def test_export_loads_in_transformers_with_the_same_logits_and_back(tmp_path, spec, fmt):
    from transformers import AutoModelForCausalLM

    from deltatune.upcycle.io import load_upcycled, save_upcycled

    model = upcycle(tiny_model(num_hidden_layers=4), spec, seed=1)
    with torch.no_grad():  # experts made different, so a mixed-up expert order would show
        for i in spec.layers:
            for ex in model.model.layers[i].mlp.experts:
                for lin in (ex.gate_proj, ex.up_proj, ex.down_proj):
                    lin.weight.add_(torch.randn_like(lin.weight) * 0.05)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        save_upcycled(model, None, tmp_path / "out")
        if fmt is not None:
            hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
            assert type(hf).__name__ == fmt
            assert (hf(ids).logits - ref).abs().max() < 1e-5
        else:
            assert not (tmp_path / "out" / "model.safetensors").exists()
        assert torch.equal(load_upcycled(tmp_path / "out")(ids).logits, ref)
