"""BitFit: only biases train; missing biases are added as zeros (identity at init)."""

import logging

import pytest
import torch
from torch import nn

from deltatune.methods.base import DeltaLinear, MethodSpec, get_method
from deltatune.methods.inject import freeze, match_targets, replace_module
from deltatune.testing import tiny_model

IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 11, 40], [1, 7, 8, 100, 200, 300, 2, 2]])


def bitfit(model, targets="all-linear"):
    freeze(model)
    method = get_method("bitfit")(MethodSpec(name="bitfit", targets=targets))
    method.apply(model)
    return method


def test_identity_at_init_and_warns_with_count(caplog):
    base = tiny_model(0)
    model = tiny_model(0)
    with caplog.at_level(logging.WARNING, logger="deltatune.methods.bitfit"):
        method = bitfit(model)
    assert method.added_biases == 14  # 2 layers x (q, k, v, o, gate, up, down); Llama has no biases
    assert "14 of 14" in caplog.text
    torch.testing.assert_close(model(IDS).logits, base(IDS).logits, rtol=0, atol=0)


def test_parameter_count_formula():
    model = tiny_model(0)
    cfg = model.config
    method = bitfit(model)
    d, ff, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    # per layer: q (d) + k (kv) + v (kv) + o (d) + gate (ff) + up (ff) + down (d)
    expected = L * (3 * d + 2 * kv + 2 * ff)
    assert sum(p.numel() for _, p in method.trainable_parameters(model)) == expected == 1024
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in method.trainable_parameters(model)}
    assert all(n.endswith(".bias") for n in trainable)


def test_gradients_only_on_biases_and_step_lowers_loss():
    model = tiny_model(0)
    method = bitfit(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam([p for _, p in method.trainable_parameters(model)], lr=1e-2)
    losses = []
    for step in range(8):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        if step == 0:
            for n, p in model.named_parameters():
                if n.endswith(".bias"):
                    assert p.grad is not None and p.grad.abs().sum() > 0, n
                else:
                    assert p.grad is None, n
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_existing_biases_are_reused_not_replaced():
    model = tiny_model(0, attention_bias=True)
    q_bias = model.model.layers[0].self_attn.q_proj.bias
    method = bitfit(model)
    assert method.added_biases == 6  # only gate/up/down lack biases
    assert model.model.layers[0].self_attn.q_proj.bias is q_bias and q_bias.requires_grad


def test_targets_restrict_which_biases_train():
    model = tiny_model(0)
    method = bitfit(model, targets="q_proj,v_proj")
    names = [n for n, _ in method.trainable_parameters(model)]
    assert sorted(names) == sorted(f"model.layers.{i}.self_attn.{m}_proj.bias" for i in (0, 1) for m in "qv")
    assert model.model.layers[0].mlp.up_proj.bias is None


def test_save_load_round_trip():
    model = tiny_model(0)
    method = bitfit(model)
    with torch.no_grad():
        for _, p in method.trainable_parameters(model):
            p.normal_()
    state = method.state_dict(model)
    fresh = tiny_model(0)
    bitfit(fresh)  # apply adds the biases the saved state refers to
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and not any(k.endswith(".bias") for k in missing)
    torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits, rtol=0, atol=0)


class _TinyLoRA(DeltaLinear):
    """Stand-in for a reparameterisation wrapper: A/B are nn.Linear children BitFit must not touch."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__(base)
        self.lora_A = nn.Linear(base.in_features, 2, bias=False)
        self.lora_B = nn.Linear(2, base.out_features, bias=False)
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B.weight.float() @ self.lora_A.weight.float()

    def adapted_forward(self, x, base_out):
        return base_out + self.lora_B(self.lora_A(x))


def test_bias_goes_inside_wrappers_and_adapter_linears_are_skipped():
    model = tiny_model(0)
    freeze(model)
    for name in match_targets(model, "q_proj,v_proj"):
        replace_module(model, name, _TinyLoRA(model.get_submodule(name)))
    method = bitfit(model)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, _TinyLoRA) and q.base.bias is not None and q.base.bias.requires_grad
    assert q.lora_A.bias is None and q.lora_B.bias is None
    assert method.added_biases == 14
    assert "model.layers.0.self_attn.q_proj.base.bias" in dict(method.trainable_parameters(model))


def test_merge_is_a_no_op():
    model = tiny_model(0)
    method = bitfit(model)
    with torch.no_grad():  # added biases start at zero: trained values, so that a merge touching them shows
        for _, p in method.trainable_parameters(model):
            p.normal_(0, 0.1)
    biases = {n: p.detach().clone() for n, p in method.trainable_parameters(model)}
    before = model(IDS).logits
    assert not torch.allclose(before, tiny_model(0)(IDS).logits, atol=1e-3)
    method.merge(model)
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)
    assert all(torch.equal(p, biases[n]) for n, p in method.trainable_parameters(model))


@pytest.mark.parametrize("targets", ["nonexistent_proj"])
def test_bad_target_is_a_config_error(targets):
    from deltatune.errors import ConfigError

    with pytest.raises(ConfigError, match="no module matches"):
        bitfit(tiny_model(0), targets=targets)


def test_lora_plus_bitfit_through_apply_methods(tmp_path):
    from deltatune.methods.apply import apply_methods, load_adapter

    base = tiny_model(0)
    model = tiny_model(0)
    adapted = apply_methods(
        model, [MethodSpec(name="lora", targets="q_proj,v_proj", rank=2), MethodSpec(name="bitfit")]
    )
    torch.testing.assert_close(model(IDS).logits, base(IDS).logits, rtol=0, atol=1e-6)
    names = [n for n, _ in adapted.trainable_parameters()]
    assert "model.layers.0.self_attn.q_proj.base.bias" in names and any("lora_B" in n for n in names)
    opt = torch.optim.Adam([p for _, p in adapted.trainable_parameters()], lr=1e-2)
    for _ in range(3):
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    grads_seen = {n for n, p in adapted.trainable_parameters() if not torch.equal(p, torch.zeros_like(p))}
    assert any(n.endswith(".bias") for n in grads_seen) and any("lora_B" in n for n in grads_seen)
    adapted.save_adapter(tmp_path / "a")
    loaded = load_adapter(tiny_model(0), tmp_path / "a")
    torch.testing.assert_close(loaded.model(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_bitfit_before_lora_on_the_same_layers_is_a_config_error():
    from deltatune.errors import ConfigError
    from deltatune.methods.apply import apply_methods

    with pytest.raises(ConfigError, match="froze it"):
        apply_methods(tiny_model(0), [MethodSpec(name="bitfit"), MethodSpec(name="lora", targets="q_proj", rank=2)])


# --- merged export of a bias-less architecture ---------------------------------------------------
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 11, 40]])


def _trained_bitfit(targets):
    from deltatune.methods.apply import apply_methods

    adapted = apply_methods(tiny_model(0), MethodSpec("bitfit", targets=targets))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in adapted.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return adapted


@pytest.mark.parametrize("route", ["export_merged", "merge_and_unload"])
@pytest.mark.parametrize(
    "targets,flags",
    [
        ("all-linear", {"attention_bias": True, "mlp_bias": True}),
        ("q_proj", {"attention_bias": True, "mlp_bias": False}),
    ],
)
def test_merged_export_turns_on_the_config_bias_flags_and_loads(tmp_path, tiny_tok, targets, flags, route):
    from transformers import AutoModelForCausalLM

    from deltatune.methods.apply import export_merged

    adapted = _trained_bitfit(targets)
    expected = adapted.model(IDS).logits.detach()
    if route == "export_merged":
        export_merged(adapted, tiny_tok, tmp_path / "merged")
    else:  # the Python API's merge, saved by transformers itself
        adapted.merge_and_unload().save_pretrained(tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert {k: getattr(loaded.config, k) for k in flags} == flags
    torch.testing.assert_close(loaded(IDS).logits, expected, rtol=0, atol=1e-6)
    if targets == "q_proj":  # the flag also gives k, v, o biases: zeros, so the function is unchanged
        assert torch.count_nonzero(loaded.model.layers[0].self_attn.k_proj.bias) == 0


def test_merged_export_of_a_bias_no_flag_describes_fails_at_once(tmp_path, tiny_tok):
    from deltatune.errors import ConfigError
    from deltatune.methods.apply import export_merged

    adapted = _trained_bitfit("lm_head")
    with pytest.raises(
        ConfigError, match="bitfit added a bias the architecture's config cannot describe \\('lm_head.bias'"
    ):
        export_merged(adapted, tiny_tok, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert adapted.methods  # refused before merging anything


def test_disable_swaps_original_biases_back():
    from deltatune.methods.apply import apply_methods

    model = tiny_model(0, attention_bias=True)  # biases that exist keep their values when disabled
    base = tiny_model(0, attention_bias=True)(IDS).logits
    adapted = apply_methods(model, MethodSpec("bitfit"))
    with torch.no_grad():
        for _, p in adapted.trainable_parameters():
            p.add_(0.1)
    with adapted.disable_adapters():
        assert torch.equal(model(IDS).logits, base)
    assert not torch.allclose(model(IDS).logits, base)
