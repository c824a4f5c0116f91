"""Several methods on one model: claims, conflicts, adapter files and their errors."""

import json

import pytest
import torch

from deltatune.errors import ConfigError, UserError
from deltatune.methods import peft_format
from deltatune.methods.apply import apply_methods, load_adapter
from deltatune.methods.base import MethodSpec
from deltatune.methods.lora import LoRALinear
from deltatune.testing import tiny_llama_config, tiny_model

IDS = torch.tensor([[1, 5, 77, 300, 12, 9, 2, 45]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomise(adapted, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapted.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_lora_plus_full_on_norms_claims_disjoint_parameters(tmp_path):
    cfg = tiny_llama_config()
    specs = [MethodSpec(name="lora", targets="q_proj,v_proj", rank=2), MethodSpec(name="full", targets=r".*norm")]
    adapted = apply_methods(tiny_model(0), specs)
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    lora_count = cfg.num_hidden_layers * 2 * ((h + h) + (h + kv))
    norm_count = (2 * cfg.num_hidden_layers + 1) * h
    assert sum(p.numel() for _, p in adapted.trainable_parameters()) == lora_count + norm_count
    assert not adapted.is_peft_method
    randomise(adapted)
    adapted.save_adapter(tmp_path / "combo")
    assert (tmp_path / "combo" / "deltatune_adapter.json").exists()
    assert not (tmp_path / "combo" / "adapter_config.json").exists()
    reloaded = load_adapter(tiny_model(0), tmp_path / "combo")
    assert [m.name for m in reloaded.methods] == ["lora", "full"]
    assert torch.equal(logits(reloaded.model), logits(adapted.model))


def test_conflicts_are_config_errors():
    with pytest.raises(ConfigError, match="already adapted by method 'lora'"):
        apply_methods(tiny_model(0), [MethodSpec(name="lora", targets="q_proj"), MethodSpec(name="rslora")])
    with pytest.raises(ConfigError, match="both train"):
        apply_methods(tiny_model(0), [MethodSpec(name="lora", targets="q_proj"), MethodSpec(name="full")])
    with pytest.raises(ConfigError, match="froze"):
        apply_methods(tiny_model(0), [MethodSpec(name="full"), MethodSpec(name="lora", targets="q_proj")])
    with pytest.raises(ConfigError, match="given twice"):
        apply_methods(tiny_model(0), [MethodSpec(name="lora"), MethodSpec(name="lora")])
    with pytest.raises(ConfigError, match="unknown method 'lorra'"):
        apply_methods(tiny_model(0), "lorra")


def test_two_reparameterisations_on_disjoint_layers():
    adapted = apply_methods(
        tiny_model(0),
        [MethodSpec(name="lora", targets="q_proj", rank=2), MethodSpec(name="rslora", targets="v_proj", rank=4)],
    )
    kinds = {n.rsplit(".", 1)[-1]: m.method_name for n, m in adapted.model.named_modules() if isinstance(m, LoRALinear)}
    assert kinds == {"q_proj": "lora", "v_proj": "rslora"}
    randomise(adapted)
    before = logits(adapted.model)
    adapted.merge()
    torch.testing.assert_close(logits(adapted.model), before, atol=1e-5, rtol=0)


def test_lora_plus_bitfit():
    adapted = apply_methods(tiny_model(0), [MethodSpec(name="lora", rank=2), MethodSpec(name="bitfit")])
    names = [n for n, _ in adapted.trainable_parameters()]
    assert any("lora_A" in n for n in names) and any(n.endswith("bias") for n in names)
    before = logits(tiny_model(0))
    torch.testing.assert_close(logits(adapted.model), before, atol=1e-6, rtol=0)


def test_failed_save_leaves_previous_adapter_intact(tmp_path, monkeypatch):
    adapted = apply_methods(tiny_model(0), [MethodSpec(name="lora", rank=2)])
    out = tmp_path / "ad"
    adapted.save_adapter(out)
    original = (out / "adapter_model.safetensors").read_bytes()
    randomise(adapted)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(peft_format, "_save_tensors", boom)
    with pytest.raises(OSError):
        adapted.save_adapter(out)
    assert (out / "adapter_model.safetensors").read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no temporary folder left behind


def test_adapter_folder_errors(tmp_path):
    with pytest.raises(UserError, match="no such adapter folder"):
        load_adapter(tiny_model(0), tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="adapter_config.json"):
        load_adapter(tiny_model(0), tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "deltatune_adapter.json").write_text('{"format": "deltatune-adapter",\n "version": 1,\n "methods": [}')
    with pytest.raises(ConfigError, match=r"deltatune_adapter.json:3"):
        load_adapter(tiny_model(0), bad)
    (bad / "deltatune_adapter.json").write_text(
        json.dumps({"format": "deltatune-adapter", "version": 1, "methods": [{"name": "lora", "rnak": 4}]})
    )
    with pytest.raises(ConfigError, match="rnak"):
        load_adapter(tiny_model(0), bad)


def test_loading_into_a_different_architecture_names_the_tensor(tmp_path):
    adapted = apply_methods(tiny_model(0), [MethodSpec(name="lora", rank=2, targets="q_proj")])
    adapted.save_adapter(tmp_path / "a")
    with pytest.raises(ConfigError, match="shape"):
        load_adapter(tiny_model(0, hidden_size=32, intermediate_size=64), tmp_path / "a")
