"""deltatune's methods and loss masking inside transformers' Trainer and TRL's SFTTrainer give the
same objective as deltatune's own trainer, on the same batch."""

from __future__ import annotations

import math

import pytest
import torch

import deltatune

RECORDS = [
    {"instruction": f"What is {a} + {b}?", "output": f"The answer is {a + b}."} for a in range(4) for b in range(3)
]  # 12 examples: one batch
LR = 1e-2


def own_trainer_losses(tiny_dir, tmp_path, **overrides) -> list[float]:
    """deltatune's own loop, two optimizer steps over the whole data set as one batch."""
    config = dict(
        model=str(tiny_dir),
        method="lora",
        rank=4,
        alpha=8,
        targets="all-linear",
        policy="instruction",
        steps=2,
        batch_size=len(RECORDS),
        seq_len=64,
        packing=False,
        precision="fp32",
        fused_norms="off",
        eval_fraction=0.0,
        lr=LR,
        schedule="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        output=str(tmp_path / "own"),
        log_every=1,
        seed=0,
    )
    config.update(overrides)
    result = deltatune.train(config, quiet=True, records=RECORDS, eval_records=[])
    return [h["loss"] for h in result.history]


def adapted_tiny(tiny_dir):
    torch.manual_seed(0)  # as deltatune's loop seeds before loading: the same LoRA initialisation
    model, tokenizer = deltatune.load_model(tiny_dir)
    adapted = deltatune.apply(model, "lora", rank=4, alpha=8, targets="all-linear")
    return adapted, tokenizer


def trainer_args(tmp_path, cls=None, **extra):
    from transformers import TrainingArguments

    cls = cls or TrainingArguments
    return cls(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=len(RECORDS),
        max_steps=2,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **extra,
    )


def logged_losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("packing", [False, True])
def test_trainer_with_deltatune_collator_matches_own_trainer(tiny_dir, tmp_path, packing):
    """Trainer + deltatune.apply + DataCollator under `instruction`: the first step's loss equals
    deltatune's own trainer's on the same batch, and so does the second (same AdamW step). Packed
    rows (rows of 64 tokens, several examples each) give the same loss as one example per row."""
    from transformers import Trainer

    own = own_trainer_losses(tiny_dir, tmp_path)
    adapted, tokenizer = adapted_tiny(tiny_dir)
    dataset = deltatune.prepare(RECORDS, tokenizer, policy="instruction", max_len=64)
    collator = deltatune.DataCollator(tokenizer, packing=packing, max_length=64 if packing else None)
    if packing:
        batch = collator([dataset[i] for i in range(len(dataset))])
        assert batch["input_ids"].shape[0] < len(RECORDS)  # examples really share rows
    trainer = Trainer(model=adapted.model, args=trainer_args(tmp_path), train_dataset=dataset, data_collator=collator)
    trainer.train()
    theirs = logged_losses(trainer)
    assert len(theirs) == 2 and len(own) == 2
    assert theirs[0] == pytest.approx(own[0], rel=1e-5, abs=1e-6)
    assert theirs[1] == pytest.approx(own[1], rel=1e-4, abs=1e-5)
    assert theirs[1] < theirs[0]  # it trained


def test_weighted_trainer_matches_own_trainer_with_fractional_weights(tiny_dir, tmp_path):
    """`weighted:0.3` cannot be expressed by labels: WeightedLossTrainer with the collator's
    loss_weights gives deltatune's Σ w·nll / Σ w, equal to its own trainer's first step."""
    own = own_trainer_losses(tiny_dir, tmp_path, policy="weighted:0.3")
    adapted, tokenizer = adapted_tiny(tiny_dir)
    dataset = deltatune.prepare(RECORDS, tokenizer, policy="weighted:0.3", max_len=64)
    plain = deltatune.DataCollator(tokenizer)
    with pytest.raises(deltatune.ConfigError, match="fractional"):
        plain([dataset[0]])
    collator = deltatune.DataCollator(tokenizer, return_loss_weights=True)
    trainer = deltatune.WeightedLossTrainer(
        model=adapted.model, args=trainer_args(tmp_path), train_dataset=dataset, data_collator=collator
    )
    trainer.train()
    theirs = logged_losses(trainer)
    assert theirs[0] == pytest.approx(own[0], rel=1e-5, abs=1e-6)
    assert theirs[1] == pytest.approx(own[1], rel=1e-4, abs=1e-5)


def test_weighted_trainer_evaluates_the_weighted_objective(tiny_dir, tmp_path):
    """evaluate() normalised Σ w·nll by transformers' count of labelled tokens, not by Σ w: under `weighted:0.3`
    eval_loss came out 0.79x the objective (Σ w over the labelled tokens)."""
    adapted, tokenizer = adapted_tiny(tiny_dir)
    dataset = deltatune.prepare(RECORDS, tokenizer, policy="weighted:0.3", max_len=64)
    collator = deltatune.DataCollator(tokenizer, return_loss_weights=True)
    args = trainer_args(tmp_path, per_device_eval_batch_size=len(RECORDS))
    trainer = deltatune.WeightedLossTrainer(
        model=adapted.model, args=args, eval_dataset=dataset, data_collator=collator
    )
    reported = trainer.evaluate()["eval_loss"]
    batch = collator([dataset[i] for i in range(len(dataset))])
    adapted.model.eval()
    with torch.no_grad():
        logits = adapted.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = deltatune.weighted_loss(logits, batch["input_ids"], batch["loss_weights"]).item()
    assert (batch["loss_weights"] == 0.3).any()  # fractional weights present
    assert reported == pytest.approx(expected, rel=1e-5)


def test_sft_trainer_with_deltatune_collator_matches_own_trainer(tiny_dir, tmp_path):
    """TRL's SFTTrainer takes the custom collator and a pre-tokenized dataset: same first-step loss."""
    trl = pytest.importorskip("trl")
    own = own_trainer_losses(tiny_dir, tmp_path)
    adapted, tokenizer = adapted_tiny(tiny_dir)
    dataset = deltatune.prepare(RECORDS, tokenizer, policy="instruction", max_len=64)
    args = trainer_args(
        tmp_path,
        cls=trl.SFTConfig,
        bf16=False,  # fp32, as the own run
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer = trl.SFTTrainer(
        model=adapted.model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=deltatune.DataCollator(tokenizer),
    )
    trainer.train()
    theirs = logged_losses(trainer)
    assert theirs[0] == pytest.approx(own[0], rel=1e-5, abs=1e-6)
    assert theirs[1] == pytest.approx(own[1], rel=1e-4, abs=1e-5)
    assert math.isfinite(theirs[1])
