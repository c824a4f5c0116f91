"""`deltatune merge` and `deltatune export` end to end on a tiny model folder."""

import json

import pytest
import torch

from deltatune.cli import main
from deltatune.methods.apply import apply_methods
from deltatune.methods.base import MethodSpec
from deltatune.models import save_model
from deltatune.testing import tiny_model, tiny_tokenizer

IDS = torch.tensor([[1, 5, 77, 300, 12, 9, 2, 45]])


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def load(folder, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)


@pytest.fixture
def base_dir(tmp_path):
    return save_model(tiny_model(0), tiny_tokenizer(), tmp_path / "base")


def make_adapter(base_dir, out, specs, base_name=True):
    # a model loaded from a folder records that folder as the adapter's base; an in-memory one names none
    adapted = apply_methods(load(base_dir) if base_name else tiny_model(0), specs)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in adapted.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    adapted.save_adapter(out)
    return logits(adapted.model)


def test_merge_uses_the_base_named_in_the_adapter(tmp_path, base_dir, capsys):
    expected = make_adapter(base_dir, tmp_path / "a", [MethodSpec(name="lora", rank=4, alpha=8)])
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    assert main(["merge", "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m")]) == 0
    assert "wrote" in capsys.readouterr().out
    torch.testing.assert_close(logits(load(tmp_path / "m")), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("command", ["merge", "export"])
def test_merge_or_export_without_a_named_base_needs_model(tmp_path, base_dir, capsys, command):
    """An adapter that names no base is not merged into the default model unasked (export did, ending in
    "adapter lacks 392 tensor(s)" or, for a same-shaped model, merging into a model it was not trained on)."""
    expected = make_adapter(base_dir, tmp_path / "a", [MethodSpec(name="lora", rank=2)], base_name=False)
    assert main([command, "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()
    if command == "export":
        return
    assert (
        main(
            [
                command,
                "--adapter",
                str(tmp_path / "a"),
                "--out",
                str(tmp_path / "m"),
                "--model",
                str(base_dir),
                "--save-dtype",
                "bf16",
            ]
        )
        == 0
    )
    merged = load(tmp_path / "m", dtype=None)
    assert merged.dtype == torch.bfloat16
    torch.testing.assert_close(logits(merged).float(), expected, atol=0.05, rtol=0.05)


def test_export_combination_adapter_and_plain_model(tmp_path, base_dir):
    specs = [MethodSpec(name="lora", rank=2, targets="q_proj,v_proj"), MethodSpec(name="full", targets=".*norm")]
    expected = make_adapter(base_dir, tmp_path / "a", specs)
    assert (tmp_path / "a" / "deltatune_adapter.json").exists()
    assert main(["export", "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "e")]) == 0
    torch.testing.assert_close(logits(load(tmp_path / "e")), expected, atol=1e-5, rtol=0)
    assert main(["export", "--model", str(base_dir), "--out", str(tmp_path / "plain")]) == 0
    assert torch.equal(logits(load(tmp_path / "plain")), logits(tiny_model(0)))


def test_merge_errors_are_one_line(tmp_path, capsys):
    assert main(["merge", "--adapter", str(tmp_path / "none"), "--out", str(tmp_path / "m")]) == 2
    assert "no such adapter folder" in capsys.readouterr().err


def test_merge_in_bf16_adds_the_adapter_as_saved_and_rounds_once(tmp_path, base_dir):
    """`merge --dtype bf16`: W (bf16) + s B A computed from the adapter's fp32 tensors, rounded once to bf16;
    the adapter was first rounded to bf16 itself, so merged entries came out one bf16 step off."""
    from safetensors.torch import load_file

    adapted = apply_methods(load(base_dir), [MethodSpec("lora", rank=4, alpha=8, targets="q_proj")])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in adapted.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    adapted.save_adapter(tmp_path / "adapter")
    layer = adapted.model.model.layers[0].self_attn.q_proj
    expected = (layer.base.weight.bfloat16().float() + layer.delta_weight()).bfloat16()
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(out),
                 "--dtype", "bf16"]) == 0  # fmt: skip
    merged = load_file(str(out / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(merged.bfloat16(), expected)


def test_an_adapter_records_a_relative_base_folder_as_absolute(tmp_path, base_dir, monkeypatch):
    """A model loaded from "base" (relative) is recorded by its absolute path, so `merge` run from another
    directory finds it (the relative name was resolved against wherever merge ran)."""
    monkeypatch.chdir(base_dir.parent)
    adapted = apply_methods(load(base_dir.name), [MethodSpec("lora", rank=2, targets="q_proj")])
    adapted.save_adapter(tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(base_dir.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
