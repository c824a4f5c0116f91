"""Third review of the methods: PEFT options that were loaded as plain settings while changing what the adapter
computes, and other defects found by running PEFT beside deltatune."""

import pytest
import torch

from deltatune.errors import ConfigError
from deltatune.methods.apply import load_adapter
from deltatune.testing import tiny_model

peft = pytest.importorskip("peft")

from test_peft_format import logits  # noqa: E402  (the shared inputs and eval-mode logits)


def randomise(model, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def peft_saved(tmp_path, config, make=lambda: tiny_model(0)):
    """A PEFT adapter trained a little (random changes) and saved; returns (folder, its logits)."""
    model = peft.get_peft_model(make(), config)
    randomise(model)
    expected = logits(model)
    model.save_pretrained(str(tmp_path / "p"))
    return tmp_path / "p", expected


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_peft_adapter_made_with_a_base_changing_init_is_refused_not_loaded_on_the_wrong_base(tmp_path, init):
    """PiSSA/OLoRA subtract the starting B A from the base: the saved adapter fits only that residual base. PEFT
    rebuilds it on load (its logits equal the trained model's); deltatune read the init as kaiming and gave other
    logits (max |diff| 5e-3 / 8e-3 on the tiny model)."""
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=init, task_type="CAUSAL_LM")
    folder, expected = peft_saved(tmp_path, config)
    reloaded = peft.PeftModel.from_pretrained(tiny_model(0), str(folder))
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="init_lora_weights"):
        load_adapter(tiny_model(0), folder)


def test_a_converted_pissa_adapter_still_loads_with_peft_logits(tmp_path):
    """The way out the error names: PEFT's conversion gives a plain LoRA of the original base."""
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa", task_type="CAUSAL_LM")
    model = peft.get_peft_model(tiny_model(0), config)
    model.save_pretrained(str(tmp_path / "init"))
    randomise(model)
    expected = logits(model)
    model.save_pretrained(str(tmp_path / "p"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    torch.testing.assert_close(logits(load_adapter(tiny_model(0), tmp_path / "p").model), expected, atol=1e-5, rtol=0)


def test_a_peft_alora_adapter_is_refused_not_applied_to_every_token(tmp_path):
    """aLoRA applies the adapter only from its invocation tokens on; deltatune applied it everywhere (max |diff|
    9e-3 against PEFT's logits)."""
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], alora_invocation_tokens=[77, 300], task_type="CAUSAL_LM")
    folder, _ = peft_saved(tmp_path, config)
    with pytest.raises(ConfigError, match="alora_invocation_tokens"):
        load_adapter(tiny_model(0), folder)


@pytest.mark.parametrize("use_dora", [False, True])
def test_a_peft_adapter_on_lm_head_loads_with_peft_logits(tmp_path, use_dora):
    """PEFT saves the frozen `lm_head.base_layer.weight` beside an adapted output head (save_embedding_layers);
    deltatune refused such a file ("adapter has 1 tensor(s) the model lacks") although the tensor is the base's own."""
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], use_dora=use_dora, task_type="CAUSAL_LM")
    folder, expected = peft_saved(tmp_path, config)
    torch.testing.assert_close(logits(load_adapter(tiny_model(0), folder).model), expected, atol=1e-5, rtol=0)
    # onto a bf16 copy of the same base: the saved fp32 copy rounds to it, so it is the same base
    bf16 = load_adapter(tiny_model(0, dtype=torch.bfloat16), folder)
    assert bf16.model.lm_head.base.weight.dtype == torch.bfloat16


def test_a_peft_adapter_whose_saved_head_differs_from_the_base_is_refused(tmp_path):
    """Saved base weights other than the model's (a resized or retrained vocabulary) are not silently dropped."""
    config = peft.LoraConfig(r=4, target_modules=["lm_head"], task_type="CAUSAL_LM")
    folder, _ = peft_saved(tmp_path, config, make=lambda: tiny_model(1))
    with pytest.raises(ConfigError, match="lm_head.base_layer.weight"):
        load_adapter(tiny_model(0), folder)


@pytest.mark.parametrize(
    "config, field",
    [
        (lambda: peft.LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=0), "layers_to_transform"),
        (lambda: peft.VeraConfig(r=4, target_modules=["q_proj"], layers_to_transform=0), "layers_to_transform"),
        (
            lambda: peft.IA3Config(
                target_modules=["k_proj", "down_proj"],
                feedforward_modules=["down_proj"],
                exclude_modules=["model.layers.1.self_attn.k_proj"],
            ),
            "exclude_modules",
        ),
    ],
)
def test_peft_options_that_select_fewer_layers_are_named_not_reported_as_missing_tensors(tmp_path, config, field):
    """`layers_to_transform: 0` is falsy and IA3's `exclude_modules` was not checked: the valid PEFT file was then
    blamed ("adapter lacks 2 tensor(s) the model needs") instead of naming the option deltatune does not support."""
    cfg = config()
    cfg.task_type = "CAUSAL_LM"
    peft.get_peft_model(tiny_model(0), cfg).save_pretrained(str(tmp_path / "p"))
    with pytest.raises(ConfigError, match=f"field '{field}': PEFT .* option {field}="):
        load_adapter(tiny_model(0), tmp_path / "p")
