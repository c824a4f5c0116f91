"""Full finetuning, of everything or of chosen modules."""

import pytest
import torch

from deltatune.errors import ConfigError
from deltatune.methods.apply import apply_methods, load_adapter
from deltatune.methods.base import MethodSpec
from deltatune.testing import tiny_llama_config, tiny_model

IDS = torch.tensor([[1, 5, 77, 300, 12, 9, 2, 45]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def train_steps(adapted, n=2, lr=1e-2):
    opt = torch.optim.AdamW([p for _, p in adapted.trainable_parameters()], lr=lr)
    for _ in range(n):
        adapted.model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()


def layer_param_count(cfg):
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    return h * h + 2 * h * kv + h * h + 3 * h * i + 2 * h  # q, k, v, o, gate/up/down, two RMSNorms


def test_all_parameters_train_and_merge_is_a_no_op():
    model = tiny_model(0)
    total = sum(p.numel() for p in model.parameters())
    adapted = apply_methods(model, [MethodSpec(name="full")])
    assert sum(p.numel() for _, p in adapted.trainable_parameters()) == total
    assert adapted.model(input_ids=IDS).logits.shape[-1] == 512
    train_steps(adapted)
    before = logits(adapted.model)
    adapted.merge()
    assert torch.equal(logits(adapted.model), before)
    adapted.unmerge()
    assert torch.equal(logits(adapted.model), before)


def test_chosen_layer_only(tmp_path):
    cfg = tiny_llama_config()
    adapted = apply_methods(tiny_model(0), [MethodSpec(name="full", targets="model.layers.1")])
    trainable = adapted.trainable_parameters()
    assert sum(p.numel() for _, p in trainable) == layer_param_count(cfg)
    assert all(n.startswith("model.layers.1.") for n, _ in trainable)
    frozen = {n: p.detach().clone() for n, p in adapted.model.named_parameters() if not n.startswith("model.layers.1.")}
    train_steps(adapted)
    for n, p in adapted.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    adapted.save_adapter(tmp_path / "a")
    reloaded = load_adapter(tiny_model(0), tmp_path / "a")
    assert torch.equal(logits(reloaded.model), logits(adapted.model))
    assert not torch.equal(logits(tiny_model(0)), logits(adapted.model))


def test_regex_targets_and_save_is_full_weights(tmp_path):
    adapted = apply_methods(tiny_model(0), [MethodSpec(name="full", targets=r"model\.layers\.\d+\.mlp\..*")])
    cfg = tiny_llama_config()
    expect = cfg.num_hidden_layers * 3 * cfg.hidden_size * cfg.intermediate_size
    assert sum(p.numel() for _, p in adapted.trainable_parameters()) == expect
    everything = apply_methods(tiny_model(0), "full")
    train_steps(everything)
    everything.save_adapter(tmp_path / "full")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    assert set(saved) == {n for n, _ in everything.model.named_parameters()}
    fresh = load_adapter(tiny_model(1), tmp_path / "full")  # a differently initialised base: all weights replaced
    assert torch.equal(logits(fresh.model), logits(everything.model))


def test_unknown_target_and_options():
    with pytest.raises(ConfigError, match="q_proj"):
        apply_methods(tiny_model(0), [MethodSpec(name="full", targets="layers.7")])
    with pytest.raises(ConfigError, match="no options"):
        apply_methods(tiny_model(0), [MethodSpec(name="full", options={"lr": 1})])
