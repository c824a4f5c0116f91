"""Qwen2-MoE exports and the shared expert deltatune's MoE does not have: transformers loads the export
without warnings, the shared expert adds exactly 0 and stays 0 under training, a shared expert that adds
something is refused rather than dropped, and earlier zero-width exports still load."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltatune.cli import main
from deltatune.errors import UserError
from deltatune.upcycle import io as upcycle_io
from deltatune.upcycle.io import load_upcycled


def _export(src, out) -> None:
    assert main(["upcycle", "--model", str(src), "--experts", "4", "--out", str(out)]) == 0
    assert json.loads((out / "upcycle.json").read_text())["format"] == "qwen2_moe"


@pytest.fixture(scope="module")
def moe_dir(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shared") / "moe"
    _export(tiny_dir, out)
    return out


def _ids():
    return torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))


def test_transformers_loads_the_qwen2_moe_export_without_warnings(moe_dir):
    """The zero-width shared expert made torch warn three times per load ('Initializing zero-element tensors
    is a no-op'), on every user's from_pretrained of the export."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = AutoModelForCausalLM.from_pretrained(str(moe_dir))
    assert [str(w.message) for w in caught] == []
    shared = theirs.model.layers[1].mlp.shared_expert
    assert shared.down_proj.weight.numel() > 0 and not shared.down_proj.weight.any()
    ours = load_upcycled(moe_dir)
    with torch.no_grad():
        assert (ours(_ids()).logits - theirs(_ids()).logits).abs().max() < 1e-5


def test_the_shared_expert_stays_zero_when_the_export_is_trained_further(moe_dir):
    """All-zero projections are a fixed point of gradient descent: every gradient of the shared expert and its
    gate is exactly zero, so a user who finetunes the export keeps deltatune's model."""
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(str(moe_dir))
    ids = _ids()
    theirs(ids, labels=ids).loss.backward()
    mlp = theirs.model.layers[1].mlp
    grads = [p.grad for p in [*mlp.shared_expert.parameters(), *mlp.shared_expert_gate.parameters()]]
    assert all(g is not None and not g.any() for g in grads)
    assert mlp.gate.weight.grad.abs().sum() > 0  # the router does learn: the check is not vacuous


def test_a_shared_expert_that_adds_something_is_refused_naming_the_tensor(moe_dir, tmp_path):
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(moe_dir, edited)
    weights = edited / "model.safetensors"
    sd = load_file(str(weights))
    sd["model.layers.1.mlp.shared_expert.down_proj.weight"] = torch.ones_like(
        sd["model.layers.1.mlp.shared_expert.down_proj.weight"]
    )
    for name in ("gate_proj", "up_proj"):
        sd[f"model.layers.1.mlp.shared_expert.{name}.weight"] = torch.ones_like(
            sd[f"model.layers.1.mlp.shared_expert.{name}.weight"]
        )
    save_file(sd, str(weights), metadata={"format": "pt"})
    with pytest.raises(UserError) as err:
        load_upcycled(edited)
    message = str(err.value)
    assert "model.layers.1.mlp.shared_expert" in message and "model.safetensors" in message
    assert "\n" not in message


def test_a_zero_width_export_of_an_earlier_release_still_loads(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(upcycle_io, "SHARED_EXPERT_WIDTH", 0)
    old = tmp_path / "old"
    _export(tiny_dir, old)
    assert json.loads((old / "config.json").read_text())["shared_expert_intermediate_size"] == 0
    monkeypatch.undo()
    fresh = tmp_path / "fresh"
    _export(tiny_dir, fresh)
    with torch.no_grad():
        a, b = load_upcycled(old)(_ids()).logits, load_upcycled(fresh)(_ids()).logits
    assert torch.equal(a, b)
