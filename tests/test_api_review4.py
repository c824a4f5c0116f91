"""Review of the public API against PEFT habits (fourth pass): each test failed before its fix."""

from __future__ import annotations

import json

import pytest
import torch

import deltatune
from deltatune.errors import ConfigError
from deltatune.testing import tiny_model


def test_peft_save_arguments_are_read_not_a_type_error(tmp_path):
    """`save_pretrained(path, safe_serialization=True)` and `selected_adapters=[...]`, as PEFT takes them, ended in
    a TypeError on an unexpected keyword."""
    adapted = deltatune.apply(tiny_model(), "lora", rank=4)
    adapted.save_pretrained(tmp_path / "a", safe_serialization=True, selected_adapters=["default"])
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    with pytest.raises(ConfigError, match="safetensors only"):
        adapted.save_pretrained(tmp_path / "b", safe_serialization=False)
    with pytest.raises(ConfigError, match="one adapter"):
        adapted.save_pretrained(tmp_path / "c", selected_adapters=["other"])


def test_a_torch_method_on_the_adapted_model_says_to_use_its_model():
    """`Trainer(model=adapted)` (as one passes a PeftModel) failed deep inside the Trainer on `'AdaptedModel' object
    has no attribute 'to'`."""
    adapted = deltatune.apply(tiny_model(), "lora", rank=4)
    with pytest.raises(AttributeError, match=r"not a torch module; its `.model` is \(pass adapted.model to a Trainer"):
        adapted.to("cpu")
    with pytest.raises(AttributeError, match="no attribute 'nothing_like_this'"):
        adapted.nothing_like_this  # noqa: B018


def test_a_trainers_save_of_an_adapted_model_is_refused_not_loaded_with_random_layers(tmp_path, capsys):
    """`Trainer.save_model` writes `adapted.model` whole: keys `q_proj.base.weight`, `q_proj.lora_A.weight`. The
    folder loaded with every adapted linear at random (logits 0.65 away), and `deltatune export` wrote that model
    out as a clean folder."""
    from reliability_helpers import cli

    from deltatune.models import load_model
    from deltatune.testing import tiny_tokenizer

    adapted = deltatune.apply(tiny_model(), "lora", rank=4, targets="q_proj")
    adapted.model.save_pretrained(tmp_path / "saved")
    tiny_tokenizer().save_pretrained(tmp_path / "saved")
    with pytest.raises(deltatune.UserError, match="holds a model with deltatune adapters inside"):
        load_model(tmp_path / "saved")
    rc, _, err = cli(capsys, "export", "--model", tmp_path / "saved", "--out", tmp_path / "out")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "adapted.save_adapter" in err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_missing_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from deltatune.models import load_model
    from deltatune.testing import tiny_tokenizer

    tiny_model().save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    weights = load_file(str(tmp_path / "m" / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(deltatune.UserError, match="lacks 1 of the model's weights .*up_proj"):
        load_model(tmp_path / "m")


def test_fractional_weights_dropped_by_a_trainer_stop_at_the_collator():
    """Trainer's remove_unused_columns drops loss_weights; the collator then read the labels, which say 1 where
    `weighted:0.1` says 0.1, and trained the `instruction` objective without a word (TRL's example too)."""
    from deltatune.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    records = [{"instruction": "What is 2 + 3?", "output": "5"}]
    dataset = deltatune.prepare(records, tok, policy="weighted:0.1")
    assert "labels" not in dataset.column_names
    as_a_trainer_passes_it = [{"input_ids": row["input_ids"]} for row in dataset]  # the model's arguments only
    with pytest.raises(deltatune.DataError, match="fractional weights .* remove_unused_columns=False"):
        deltatune.DataCollator(tok)(as_a_trainer_passes_it)
    batch = deltatune.DataCollator(tok, return_loss_weights=True)(list(dataset))  # kept columns: fine
    assert torch.isclose(batch["loss_weights"], torch.tensor(0.1)).any()
