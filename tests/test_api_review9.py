"""Review 9 of the Python API. Each test failed before its fix."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import deltatune
from deltatune.errors import ConfigError
from deltatune.testing import tiny_model


def test_full_finetuning_survives_a_deepcopy_or_pickle(tmp_path):
    # the trained weights were tracked by id: a copy trained and saved nothing (a 40-byte adapter file)
    adapted = deltatune.apply(tiny_model(), "full")
    n = len(list(adapted.trainable_parameters()))
    for copied in (copy.deepcopy(adapted), pickle.loads(pickle.dumps(adapted))):
        assert len(list(copied.trainable_parameters())) == n > 0
        own = {id(p) for p in copied.model.parameters()}
        assert all(id(p) in own for _, p in copied.trainable_parameters())  # the copy's weights, not the original's
    state = {k: v.clone() for k, v in adapted.model.state_dict().items()}
    adapted.model.load_state_dict(state, assign=True)  # new weights in the same places (the tied head apart now)
    assert len(list(adapted.trainable_parameters())) == len(list(adapted.model.parameters())) >= n


def test_targets_given_as_a_tuple_are_a_list():
    adapted = deltatune.apply(tiny_model(), "lora", targets=("q_proj", "v_proj"))  # an AttributeError 8 frames deep
    assert {n.split(".")[-3] for n, _ in adapted.trainable_parameters()} == {"q_proj", "v_proj"}


def test_disable_adapters_called_plainly_disables_as_transformers_does():
    # a context manager only: called plainly it returned one and the logits stayed the adapted ones
    model = tiny_model()
    ids = torch.randint(3, 500, (1, 8))
    with torch.no_grad():
        base = model(ids).logits
    adapted = deltatune.apply(model, "lora")
    for m in adapted.model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    with torch.no_grad():
        on = adapted.model(ids).logits
        adapted.disable_adapters()
        assert torch.equal(adapted.model(ids).logits, base)
        adapted.disable_adapters()  # twice: still off, once enabled on again
        adapted.enable_adapters()
        assert torch.equal(adapted.model(ids).logits, on)
        with adapted.disable_adapters():
            assert torch.equal(adapted.model(ids).logits, base)
        assert torch.equal(adapted.model(ids).logits, on)
        with adapted.disabled():
            assert torch.equal(adapted.model(ids).logits, base)
    with pytest.raises(AttributeError, match="holds one adapter"):
        adapted.set_adapter("other")


def test_load_adapter_can_freeze_and_saving_keeps_a_model_card(tmp_path):
    adapted = deltatune.apply(tiny_model(), "lora")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "README.md").write_text("# my adapter\n")  # it was deleted: the folder is replaced whole
    adapted.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / "README.md").read_text() == "# my adapter\n"
    frozen = deltatune.load_adapter(tiny_model(), tmp_path / "a", is_trainable=False)
    assert all(not p.requires_grad for p in frozen.model.parameters())
    assert frozen.adapter_state_dict().keys() == adapted.adapter_state_dict().keys()
    assert all(p.requires_grad for _, p in deltatune.load_adapter(tiny_model(), tmp_path / "a").trainable_parameters())


def test_a_train_config_built_in_python_refuses_in_one_line():
    from deltatune.config import TrainConfig

    with pytest.raises(ConfigError, match=r"^TrainConfig: unknown key 'rnak'; did you mean 'rank'\?$"):
        TrainConfig(rnak=8)
    with pytest.raises(ConfigError, match=r"^TrainConfig: field 'rank'"):
        TrainConfig(rank="x")
