"""LoRA with deltatune's loss policy in your own PyTorch loop.

    python examples/own_loop.py --steps 30 --policy instruction --output runs/own-loop

The loss is deltatune's: Σ w·nll / Σ w over the batch, where the policy sets the weights (fractional
ones too, e.g. --policy weighted:0.1). Packed rows keep their examples apart with a 4D mask.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

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
    collator = deltatune.DataCollator(tokenizer, packing=True, max_length=2 * args.max_len, return_loss_weights=True)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, collate_fn=collator)
    optimizer = torch.optim.AdamW([p for _, p in adapted.trainable_parameters()], lr=args.lr)

    model.train()
    losses: list[float] = []
    while len(losses) < args.steps:
        for batch in loader:
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
            ).logits
            loss = deltatune.weighted_loss(logits, batch["input_ids"], batch["loss_weights"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            print(f"step {len(losses)}: loss {losses[-1]:.4f}", flush=True)
            if len(losses) == args.steps:
                break
    model.eval()
    adapter = adapted.save_adapter(Path(args.output) / "adapter")  # PEFT's format
    print(f"saved {adapter}")
    return {"losses": losses, "adapter": adapter, "adapted": adapted}


if __name__ == "__main__":
    main()
