"""Review of the public API against PEFT habits (fourth pass): each test failed before its fix."""

from __future__ import annotations

import json

import pytest

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
