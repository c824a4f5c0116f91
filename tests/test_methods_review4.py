"""Review of the methods (fourth pass): each test failed before its fix."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.errors import TrainingError
from deltatune.testing import tiny_model, tiny_train_config
from deltatune.train.loop import train

IDS = torch.tensor([[1, 5, 6, 7, 2, 9]])


def test_dora_on_a_weight_with_an_all_zero_row_computes_the_base_and_merges_back():
    """The tied head of the tiny Llama has an all-zero row (a reserved token, as in real checkpoints): DoRA's
    m / n was 0 / 0 there and every logit NaN from the first forward. The row now stays 0, as in the base."""
    model = tiny_model()
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        head[7].zero_()
    base = model(input_ids=IDS).logits.clone()
    adapted = deltatune.apply(model, "dora", targets="lm_head,q_proj", rank=4, alpha=8)
    torch.testing.assert_close(model(input_ids=IDS).logits, base, atol=1e-6, rtol=0)
    with torch.no_grad():
        for name, p in adapted.trainable_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
    adapted_logits = model(input_ids=IDS).logits
    assert torch.isfinite(adapted_logits).all()
    assert (adapted_logits[..., 7] == 0).all()  # magnitude 0 keeps the row's output 0
    adapted.merge()
    torch.testing.assert_close(model(input_ids=IDS).logits, adapted_logits, atol=1e-5, rtol=0)
    adapted.unmerge()
    torch.testing.assert_close(model(input_ids=IDS).logits, adapted_logits, atol=1e-6, rtol=0)


def test_a_nan_loss_names_a_checkpoint_only_when_there_is_one(tiny_dir, data_file, tmp_path, monkeypatch):
    """The message pointed at `checkpoints/` for the last good checkpoint when the run had written none."""
    import deltatune.train.loop as loop

    real = loop.weighted_lm_loss_sum

    def nan_loss(*args, **kwargs):
        total, weight = real(*args, **kwargs)
        return total * float("nan"), weight

    monkeypatch.setattr(loop, "weighted_lm_loss_sum", nan_loss)
    with pytest.raises(TrainingError) as caught:
        train(tiny_train_config(tiny_dir, data_file, tmp_path / "run", steps=2), quiet=True)
    assert "loss became nan at step 1" in str(caught.value) and "checkpoint" not in str(caught.value)
