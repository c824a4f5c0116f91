"""Review 7 of the methods and the training loop: QLoRA's merge_requantize leaves merge_and_unload a plain model,
IA3's vectors get no weight decay, and an MoE block that routed no token adds no NaN."""

from __future__ import annotations

import torch

import deltatune
from deltatune.methods.nf4 import NF4Linear
from deltatune.testing import tiny_model
from deltatune.train.optim import decay_groups

IDS = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))


def test_merge_and_unload_of_qlora_with_merge_requantize_is_a_plain_model(tmp_path):
    # the merged linears were requantised to NF4: save_pretrained wrote NF4 codes and from_pretrained gave
    # random weights in their place, with a warning
    from transformers import AutoModelForCausalLM

    adapted = deltatune.apply(tiny_model(), "qlora", rank=4, merge_requantize=True)
    with torch.no_grad():
        for _, p in adapted.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        want = adapted.model(input_ids=IDS).logits
    model = adapted.merge_and_unload()
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path)(input_ids=IDS).logits
        assert torch.equal(got, model(input_ids=IDS).logits)
    assert (got - want).abs().max() < 1e-2  # the base's NF4 rounding, not random weights


def test_ia3_vectors_get_no_weight_decay_and_rank_one_lora_matrices_do():
    # IA3's (d, 1) and (1, d) vectors were decayed as matrices: their 1.0 start pulled towards 0
    ia3 = deltatune.apply(tiny_model(), "ia3")
    params = [p for _, p in ia3.trainable_parameters()]
    groups = decay_groups(params, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.0] and len(groups[0]["params"]) == len(params)
    lora = deltatune.apply(tiny_model(), "lora", rank=1)
    groups = decay_groups([p for _, p in lora.trainable_parameters()], 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1]  # LoRA's A (1, d) and B (d, 1) are matrices


def test_lomo_gives_biases_and_vectors_no_weight_decay():
    from deltatune.train.lomo import build_fused

    adapted = deltatune.apply(tiny_model(), "lora+bitfit", rank=2)
    params = [p for _, p in adapted.trainable_parameters()]
    opt = build_fused("lomo", params, lr=0.1, weight_decay=0.1)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] for p in g["params"]}
    assert decayed and all((id(p) in decayed) == (p.ndim >= 2) for p in params)


def test_a_block_that_routed_no_token_adds_no_nan():
    from deltatune.upcycle.losses import balance_loss, z_loss

    logits = torch.zeros(0, 4, requires_grad=True)
    for value in (balance_loss(logits, torch.zeros(4)), z_loss(logits)):
        assert value.item() == 0.0
        value.backward()
    assert logits.grad is not None and logits.grad.shape == (0, 4)
