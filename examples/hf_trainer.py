"""LoRA with deltatune's loss policy in transformers' Trainer.

    python examples/hf_trainer.py --steps 30 --policy instruction --output runs/hf-trainer

`deltatune.prepare` writes `labels` (-100 where the policy gives no loss) and the collator packs
examples into rows whose attention never crosses examples. For fractional policies
(weighted:λ) use deltatune.WeightedLossTrainer and DataCollator(..., return_loss_weights=True).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

import deltatune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = deltatune.load_model(args.model)
    adapted = deltatune.apply(model, "lora", rank=8, alpha=16, targets="all-linear")
    adapted.print_trainable_parameters()

    data = deltatune.prepare(
        args.data, tokenizer, policy=args.policy, column_map=args.map, max_len=args.max_len, limit=args.limit
    )
    fractional = args.policy.startswith("weighted")
    collator = deltatune.DataCollator(
        tokenizer, packing=True, max_length=2 * args.max_len, return_loss_weights=fractional
    )
    trainer_cls = deltatune.WeightedLossTrainer if fractional else Trainer
    training_args = TrainingArguments(
        output_dir=str(Path(args.output) / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = trainer_cls(model=model, args=training_args, train_dataset=data, data_collator=collator)
    trainer.train()
    adapter = adapted.save_adapter(Path(args.output) / "adapter")  # PEFT's format, not Trainer's checkpoint
    print(f"saved {adapter}")
    return {
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "adapter": adapter,
        "adapted": adapted,
    }


if __name__ == "__main__":
    main()
