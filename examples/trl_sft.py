"""LoRA with deltatune's loss policy in TRL's SFTTrainer.

    python examples/trl_sft.py --steps 30 --policy instruction --output runs/trl-sft

The dataset is already tokenized and labelled by `deltatune.prepare`, so SFTTrainer's own
preparation is skipped (`skip_prepare_dataset`) and deltatune's collator builds the batches.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from trl import SFTConfig, SFTTrainer

import deltatune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (where the hardware has it)")
    args = p.parse_args(argv)
    if args.policy.startswith("weighted"):  # labels cannot say 0.1; SFTTrainer computes its loss from labels
        p.error(
            f"--policy {args.policy}: fractional weights need deltatune.WeightedLossTrainer (examples/hf_trainer.py)"
        )
    torch.manual_seed(0)
    model, tokenizer = deltatune.load_model(args.model)
    adapted = deltatune.apply(model, "lora", rank=8, alpha=16, targets="all-linear")
    adapted.print_trainable_parameters()

    data = deltatune.prepare(
        args.data, tokenizer, policy=args.policy, column_map=args.map, max_len=args.max_len, limit=args.limit
    )
    config = SFTConfig(
        output_dir=str(Path(args.output) / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        data_collator=deltatune.DataCollator(tokenizer),
    )
    trainer.train()
    adapter = adapted.save_adapter(Path(args.output) / "adapter")
    print(f"saved {adapter}")
    return {
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "adapter": adapter,
        "adapted": adapted,
    }


if __name__ == "__main__":
    main()
