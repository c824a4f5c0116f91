"""Review of training (fourth pass): each test failed before its fix."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import deltatune
from deltatune.testing import tiny_model, tiny_train_config
from deltatune.train.loop import forward_hidden, train
from deltatune.train.loss import reference_lm_loss_sum, weighted_lm_loss_sum

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one thread is fastest (conftest.py)


def test_the_loss_of_a_model_with_an_adapted_lm_head_goes_through_the_adapter():
    """The chunked loss read `lm_head.weight`, the frozen base weight, so a LoRA on lm_head computed neither in the
    training loss nor in held-out losses, and its B matrix never left zero. Loss and gradients now equal those of
    the model's own logits."""
    adapted = deltatune.apply(tiny_model(), "lora", rank=4, targets="q_proj,lm_head")
    with torch.no_grad():
        for name, p in adapted.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    model = adapted.model
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    weights = (torch.rand(2, 24, generator=torch.Generator().manual_seed(1)) > 0.4).float()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(24).expand(2, 24)}

    got, _ = weighted_lm_loss_sum(forward_hidden(model, batch), model.get_output_embeddings(), ids, weights, chunk=8)
    got.backward()
    got_grads = {n: p.grad.clone() for n, p in adapted.trainable_parameters()}
    model.zero_grad()
    want, _ = reference_lm_loss_sum(model(input_ids=ids).logits, ids, weights)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    head_grads = [n for n in got_grads if "lm_head" in n]
    assert head_grads and all(got_grads[n].abs().sum() > 0 for n in head_grads)
    for n, p in adapted.trainable_parameters():
        torch.testing.assert_close(got_grads[n], p.grad, rtol=1e-4, atol=1e-6)


def test_training_a_lora_on_lm_head_trains_it(tiny_dir, data_file, tmp_path):
    run = tmp_path / "run"
    train(tiny_train_config(tiny_dir, data_file, run, steps=3, targets="q_proj,lm_head"), quiet=True)
    tensors = load_file(str(run / "final" / "adapter_model.safetensors"))
    head_b = [v for k, v in tensors.items() if "lm_head" in k and "lora_B" in k]
    assert head_b and head_b[0].abs().max() > 0
