"""Review 8 of the files methods write: an (IA)3 adapter whose feedforward layers are some of its targets' loads
in PEFT, and a QLoRA head on a tied model merges into a model that says it is untied."""

from __future__ import annotations

import json

import torch

import deltatune
from deltatune.methods.apply import apply_methods
from deltatune.methods.base import MethodSpec
from deltatune.testing import tiny_model

IDS = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))


def _perturb(adapted) -> None:
    with torch.no_grad():
        for _, p in adapted.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)


def test_ia3_with_feedforward_layers_named_one_by_one_loads_in_peft(tmp_path):
    # the feedforward layers fell back to full names while the targets stayed suffixes: PEFT refused the file
    # ("feedforward_modules should be a subset of target_modules")
    from peft import PeftModel

    spec = MethodSpec(
        name="ia3",
        targets=["k_proj", "v_proj", "down_proj"],
        options={"feedforward_modules": ["layers.1.mlp.down_proj"]},
    )
    adapted = apply_methods(tiny_model(), [spec])
    _perturb(adapted)
    with torch.no_grad():
        want = adapted.model(input_ids=IDS).logits
    adapted.save_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(config["feedforward_modules"]) <= set(config["target_modules"])
    theirs = PeftModel.from_pretrained(tiny_model(), tmp_path).eval()
    with torch.no_grad():
        assert (theirs(input_ids=IDS).logits - want).abs().max() < 1e-5
    again = deltatune.load_adapter(tiny_model(), tmp_path)
    with torch.no_grad():
        assert torch.equal(again.model(input_ids=IDS).logits, want)


def test_a_qlora_head_on_a_tied_model_merges_into_a_model_that_says_untied(tmp_path):
    # the NF4 head had no `.weight` to find shared, so the config kept tie_word_embeddings: true beside a merged
    # head that differs from the embeddings; a loader honouring the flag put the embeddings back as the head
    from transformers import AutoModelForCausalLM

    spec = MethodSpec(name="qlora", rank=4, alpha=8, targets="lm_head", options={"compute_dtype": "float32"})
    adapted = apply_methods(tiny_model(), [spec])
    _perturb(adapted)
    with torch.no_grad():
        want = adapted.model(input_ids=IDS).logits
    merged = adapted.merge_and_unload()
    merged.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded.tie_weights()  # what a loader that honours the config's flag does
    with torch.no_grad():
        assert (loaded(input_ids=IDS).logits - want).abs().max() < 1e-5


def test_a_model_carrying_peft_layers_is_refused_not_adapted_inside_them():
    # deltatune put LoRA on PEFT's own lora_A/lora_B/base_layer linears (36 trainable tensors), silently
    import pytest
    from peft import LoraConfig, get_peft_model

    from deltatune.errors import ConfigError
    from deltatune.methods.apply import apply_methods
    from deltatune.testing import tiny_model

    peft_model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    for model in (peft_model, peft_model.base_model.model):
        before = {n: p.requires_grad for n, p in model.named_parameters()}
        with pytest.raises(ConfigError, match=r"already carries PEFT adapter layers .*merge_and_unload\(\)"):
            apply_methods(model, "lora")
        assert {n: p.requires_grad for n, p in model.named_parameters()} == before  # left as it was
    merged = peft_model.merge_and_unload()
    assert apply_methods(merged, "lora").model is merged  # once merged, a plain model again


def test_a_float64_model_merges_lora_in_float64():
    # the delta and the merge were computed in float32: merged and unmerged logits of a float64 model 2e-7 apart
    import torch

    from deltatune.methods.apply import apply_methods
    from deltatune.testing import tiny_model

    adapted = apply_methods(tiny_model().double(), "lora")
    torch.manual_seed(0)
    for m in adapted.model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    ids = torch.randint(3, 500, (2, 12))
    with torch.no_grad():
        unmerged = adapted.model(ids).logits
        originals = {n: p.clone() for n, p in adapted.model.named_parameters() if "base" in n}
        adapted.merge()
        merged = adapted.model(ids).logits
        adapted.unmerge()
    assert (merged - unmerged).abs().max() < 1e-12
    assert all(torch.equal(p, originals[n]) for n, p in adapted.model.named_parameters() if n in originals)
