"""Fractional loss weights in other trainers: `weighted_loss` for your own loop and
`WeightedLossTrainer`, a transformers `Trainer` that optimises deltatune's objective.

deltatune's objective is loss = Σ_t w_t·nll_t / Σ_t w_t over the whole accumulated batch
(docs/architecture.md). With weights of 0 and 1 that is exactly what `Trainer` computes from
`labels`; policies such as `weighted:0.1` need the weights themselves.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from deltatune.errors import ConfigError

__all__ = ["WeightedLossTrainer", "weighted_loss"]  # noqa: F822 (WeightedLossTrainer: module __getattr__)

# what Trainer would drop (they are not model arguments) and deltatune's collator reads
DELTATUNE_COLUMNS = ("loss_weights", "roles", "turns", "last_response_turn")


def _target_weights(input_ids: Tensor, loss_weights: Tensor | None, labels: Tensor | None) -> Tensor:
    if loss_weights is not None:
        return loss_weights
    if labels is None:
        raise ValueError("weighted_loss needs loss_weights or labels")
    return (labels != -100).to(torch.float32)


def weighted_loss(
    logits: Tensor,
    input_ids: Tensor,
    loss_weights: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    num_items_in_batch: float | Tensor | None = None,
) -> Tensor:
    """Σ_t w_t·nll(token_t | tokens_<t) / normaliser, from full logits [B, T, V].

    `loss_weights[b, t]` weighs token t as a target (what `deltatune.DataCollator(...,
    return_loss_weights=True)` returns); without it, `labels != -100` gives weights 0/1. The
    normaliser is `num_items_in_batch` (the total weight of the accumulated batch, so gradient
    accumulation does not change the objective) or else this batch's total weight.
    """
    from deltatune.train.loss import reference_lm_loss_sum

    weights = _target_weights(input_ids, loss_weights, labels).to(logits.device)
    total, weight = reference_lm_loss_sum(logits, input_ids, weights)
    norm = (
        weight
        if num_items_in_batch is None
        else torch.as_tensor(num_items_in_batch, dtype=total.dtype, device=total.device)
    )
    return total / norm.clamp(min=torch.finfo(total.dtype).tiny)


def _batch_weight(batch: dict[str, Any]) -> Tensor | None:
    if "loss_weights" in batch:
        return batch["loss_weights"][:, 1:].sum()
    if "labels" in batch:
        return (batch["labels"][:, 1:] != -100).sum().to(torch.float32)
    return None


def _trainer_class():
    from transformers import Trainer

    class WeightedLossTrainer(Trainer):
        """transformers' `Trainer` with deltatune's loss: Σ w·nll / Σ w over the accumulated batch,
        from the batch's `loss_weights` (fractional policies) or else its labels. Use it with
        `deltatune.DataCollator(..., return_loss_weights=True)` and keep the `loss_weights` column
        away from the model (the collator builds it from the dataset, so that is automatic)."""

        loss_is_scaled_for_ga = True  # normalised by the whole accumulated batch's weight below

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # Trainer's own loss options, which this loss would ignore silently
            if self.args.label_smoothing_factor:
                raise ConfigError(
                    "WeightedLossTrainer has no label smoothing (its loss is deltatune's weighted one); set "
                    "label_smoothing_factor to 0, or use transformers' Trainer",
                    field="label_smoothing_factor",
                )
            if getattr(self, "compute_loss_func", None) is not None:
                raise ConfigError(
                    "WeightedLossTrainer computes deltatune's weighted loss itself; it takes no compute_loss_func",
                    field="compute_loss_func",
                )

        def _set_signature_columns_if_needed(self):  # Trainer's hook (TRL overrides it too)
            super()._set_signature_columns_if_needed()
            if self._signature_columns is not None:  # keep the columns deltatune's collator reads
                self._signature_columns = [
                    *self._signature_columns,
                    *(c for c in DELTATUNE_COLUMNS if c not in self._signature_columns),
                ]

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            weights = [_batch_weight(b) for b in batches]
            if batches and all(w is not None for w in weights):
                num_items = torch.stack([w.float() for w in weights]).sum().to(device)
                if self.args.average_tokens_across_devices and self.args.world_size > 1:
                    num_items = self.accelerator.gather(num_items).sum()
            return batches, num_items

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not model.training:  # evaluation: transformers counts labelled tokens (`labels != -100`) there, not
                # the weights, which under a fractional policy is another normaliser; each batch's own weight it is
                num_items_in_batch = None
            inputs = dict(inputs)
            loss_weights = inputs.pop("loss_weights", None)
            labels = inputs.pop("labels", None)
            outputs = model(**inputs)
            loss = weighted_loss(
                outputs.logits, inputs["input_ids"], loss_weights, labels=labels, num_items_in_batch=num_items_in_batch
            )
            if num_items_in_batch is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.accelerator.num_processes  # the gradients are averaged over processes
            return (loss, outputs) if return_outputs else loss

    return WeightedLossTrainer


def __getattr__(name: str) -> Any:  # transformers' Trainer is imported only when this class is asked for
    if name == "WeightedLossTrainer":
        cls = _trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
