"""The three examples run end to end on the tiny model: the loss falls, and the adapter each one
saves reproduces the trained model (deltatune.load_adapter; PEFT for one of them)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import deltatune

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def records_file(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    rows = [
        {"instruction": f"What is {a} + {b}?", "output": f"The answer is {a + b}."} for a in range(4) for b in range(3)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name,steps", [("own_loop", 5), ("hf_trainer", 3), ("trl_sft", 3)])
def test_example_trains_and_saves_a_loadable_adapter(name, steps, tiny_dir, records_file, tmp_path):
    if name == "trl_sft":
        pytest.importorskip("trl")
    result = load_example(name).main(
        [
            "--model",
            str(tiny_dir),
            "--data",
            str(records_file),
            "--map",
            "",
            "--steps",
            str(steps),
            "--batch-size",
            "12",
            "--max-len",
            "64",
            "--lr",
            "1e-2",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    losses = result["losses"]
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    ids = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 64]])
    trained = result["adapted"].model
    trained.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        fresh, _ = deltatune.load_model(tiny_dir)
        loaded = deltatune.load_adapter(fresh, result["adapter"])
        assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-6)
        if name == "hf_trainer":
            peft = pytest.importorskip("peft")
            theirs = peft.PeftModel.from_pretrained(deltatune.load_model(tiny_dir)[0], str(result["adapter"]))
            assert torch.allclose(theirs(input_ids=ids).logits, expected, atol=1e-5)


@pytest.mark.slow
def test_trainer_example_on_the_default_model(tmp_path, shared_data):
    """examples/hf_trainer.py as documented (default model, GSM8K), two short steps: it trains and
    saves a PEFT-format adapter for the real architecture."""
    assert (shared_data / "gsm8k" / "train.jsonl").exists()  # the example's default data
    result = load_example("hf_trainer").main(
        ["--steps", "2", "--limit", "8", "--batch-size", "4", "--max-len", "128", "--output", str(tmp_path / "out")]
    )
    assert len(result["losses"]) == 2 and all(0 < x < 10 for x in result["losses"])
    config = json.loads((result["adapter"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
