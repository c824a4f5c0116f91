"""VeRA against PEFT's VeRA: same shared matrices from the same seed, equal logits for the same trained
vectors, PEFT loads our adapter folder and we load PEFT's; merge and the float64 formula."""

import json

import pytest
import torch

from deltatune.methods.apply import apply_methods, load_adapter
from deltatune.methods.base import MethodSpec
from deltatune.testing import tiny_model

peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 11, 40], [1, 7, 8, 100, 200, 300, 2, 2]])
TARGETS = ["q_proj", "v_proj", "down_proj"]  # three shapes: (64->64), (64->32), (128->64)


def ours(seed=0):
    return apply_methods(tiny_model(0), MethodSpec("vera", targets=TARGETS, rank=4, options={"projection_seed": seed}))


def theirs(seed=0):
    config = peft.VeraConfig(r=4, target_modules=TARGETS, projection_prng_key=seed, task_type="CAUSAL_LM")
    return peft.get_peft_model(tiny_model(0), config)


def randomise(adapted):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in adapted.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_shared_matrices_equal_peft_from_the_same_seed():
    a, p = ours(7), theirs(7)
    shared = a.model.deltatune_vera
    assert torch.equal(shared.vera_A, p.base_model.vera_A["default"])
    assert torch.equal(shared.vera_B, p.base_model.vera_B["default"])
    assert shared.vera_A.shape == (4, 128) and shared.vera_B.shape == (64, 4)  # the largest d_in, d_out


def test_identity_at_init_and_parameter_count():
    a = ours()
    torch.testing.assert_close(a.model(IDS).logits, tiny_model(0)(IDS).logits, rtol=0, atol=0)
    # per layer d_out + r: q (64 + 4), v (32 + 4), down (64 + 4), two layers
    assert sum(p.numel() for _, p in a.trainable_parameters()) == 2 * (68 + 36 + 68)


def test_logits_equal_peft_for_the_same_vectors():
    a, p = ours(), theirs()
    randomise(a)
    state = {a.methods[0].to_peft_key(k): v for k, v in a.adapter_state_dict().items()}
    peft.set_peft_model_state_dict(p, state)
    torch.testing.assert_close(a.model(IDS).logits, p(IDS).logits, rtol=0, atol=1e-5)


def test_peft_loads_our_adapter_and_we_load_peft_s(tmp_path):
    a = ours()
    randomise(a)
    a.save_adapter(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["r"] == 4 and config["save_projection"] is True
    loaded = peft.PeftModel.from_pretrained(tiny_model(0), str(tmp_path / "ours"))
    expected = a.model(IDS).logits
    torch.testing.assert_close(loaded(IDS).logits, expected, rtol=0, atol=1e-5)
    loaded.save_pretrained(str(tmp_path / "theirs"))  # PEFT's own writing of the same adapter
    back = load_adapter(tiny_model(0), tmp_path / "theirs")
    torch.testing.assert_close(back.model(IDS).logits, expected, rtol=0, atol=1e-5)


def test_delta_weight_matches_float64_formula_and_merge_round_trips():
    a = ours()
    randomise(a)
    layer = a.model.model.layers[0].self_attn.v_proj
    shared = a.model.deltatune_vera
    A, B = shared.vera_A.double()[:, :64], shared.vera_B.double()[:32]
    expected = torch.diag(layer.vera_lambda_b.double()) @ B @ torch.diag(layer.vera_lambda_d.double()) @ A
    torch.testing.assert_close(layer.delta_weight().double(), expected, rtol=0, atol=1e-6)
    before = a.model(IDS).logits
    a.merge()
    torch.testing.assert_close(a.model(IDS).logits, before, rtol=0, atol=1e-5)
    a.unmerge()
    plain = a.merge_and_unload()
    assert not hasattr(plain, "deltatune_vera")
    torch.testing.assert_close(plain(IDS).logits, before, rtol=0, atol=1e-5)
