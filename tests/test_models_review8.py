"""Review 8 of loading: a config.json that does not fit its weights, or breaks its class's rules, is one line naming
it (a RuntimeError or huggingface_hub's validation error traceback), and a folder without tokenizer files is
refused where transformers builds an empty tokenizer. Each test failed before its fix."""

from __future__ import annotations

import json
import shutil

import pytest
from reliability_helpers import cli

from deltatune.errors import UserError
from deltatune.models import load_model, load_tokenizer


def _edited(tiny_dir, tmp_path, **changes):
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_config_of_other_sizes_than_the_weights_is_one_line_naming_it(tiny_dir, tmp_path, capsys):
    folder = _edited(tiny_dir, tmp_path, intermediate_size=96)
    with pytest.raises(UserError, match="config.json: does not fit the weights"):
        load_model(folder)
    rc, _, err = cli(capsys, "generate", "--model", folder, "--prompt", "hi", "--max-new-tokens", "2")
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"deltatune generate: error: {folder / 'config.json'}")


def test_a_config_breaking_its_class_rules_is_one_line_naming_it(tmp_path):
    # Qwen2's config checks that layer_types has one entry a layer: a StrictDataclassClassValidationError, which is
    # no ValueError, went through every handler
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from deltatune.testing import tiny_tokenizer

    config = Qwen2Config(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    folder = tmp_path / "qwen2"
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder) is not None
    edited = json.loads((folder / "config.json").read_text())
    edited["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(edited))
    with pytest.raises(UserError, match=r"config.json: not a valid configuration: .*num_hidden_layers"):
        load_model(folder)


def test_a_folder_without_tokenizer_files_is_refused_not_read_as_an_empty_tokenizer(tmp_path):
    # transformers 5 gives a Qwen2 folder without tokenizer files an empty Qwen2Tokenizer: every prompt tokenized to
    # nothing ("prompt 1 of 1 is empty"), every record was dropped as having no loss-bearing token
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    folder = tmp_path / "no-tokenizer"
    Qwen2ForCausalLM(config).save_pretrained(folder)
    with pytest.raises(UserError, match="are its tokenizer files there"):
        load_tokenizer(folder)


def test_an_upcycled_config_of_other_expert_sizes_is_one_line_naming_it(tiny_dir, tmp_path):
    from deltatune.cli import main

    out = tmp_path / "moe"
    assert main(["upcycle", "--model", str(tiny_dir), "--experts", "4", "--layers", "1", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    config["moe_intermediate_size"] = 48
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="config.json: does not fit the weights"):
        load_model(out)
