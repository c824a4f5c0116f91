"""deltatune's loss masking and packing for other trainers: a `datasets.Dataset` of tokenized,
role-tagged examples, and a collator that gives transformers' `Trainer` and TRL what they expect.

Rows of the dataset (`examples_to_dataset`): `input_ids`, `labels` (-100 where the weight is 0),
`loss_weights`, `roles` and `turns` (per token), `last_response_turn` (the turn of the record's last answer
when truncation cut the example, else None: `turns=last` trains that answer or none), `source`. The weight of
token t is its weight as a prediction target; the first token of every example weighs 0, as in deltatune's own
batches.

The collator builds batches with `deltatune.data.packing.collate`, the function deltatune's own
trainer uses, so the two see the same tensors. Packed rows carry a 4D additive float mask
[B, 1, T, T] (0 = may attend, the dtype's minimum = may not) that is block-diagonal and causal, and
position ids restarting at 0 per example: position ids alone do not keep packed examples apart
under SDPA (docs/architecture.md). An additive mask works with transformers' eager and SDPA
attention alike (a boolean one would be added as 0/1 by eager attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from deltatune.data.masking import LossPolicy, PolicySchedule, parse_policy, policy_weights
from deltatune.data.packing import additive_mask, collate, pack_examples
from deltatune.data.segments import Role, TokenizedExample
from deltatune.errors import ConfigError, DataError

IGNORE_INDEX = -100  # transformers' and PyTorch's "no loss here" label
_LAYOUT_POLICY = LossPolicy("all")  # collate's layout when the weights come with the features


def single_policy(policy: str | LossPolicy) -> LossPolicy:
    """A policy name ("instruction", "weighted:0.1", ...) or a LossPolicy; not a two-phase schedule."""
    parsed = parse_policy(policy) if isinstance(policy, str) else policy
    if isinstance(parsed, PolicySchedule):
        raise ConfigError(
            f"'{policy}' is a two-phase schedule; give one policy here and switch between two "
            "collators (or use deltatune.train, which runs schedules)",
            field="policy",
        )
    if not isinstance(parsed, LossPolicy):
        raise ConfigError(
            f"policy must be a name like 'response' or a LossPolicy, got {type(policy).__name__}", field="policy"
        )
    return parsed


def example_weights(example: TokenizedExample, policy: LossPolicy) -> list[float]:
    """The policy's weights with the first token at 0 (nothing of the example precedes it)."""
    weights = policy_weights(example, policy)
    if weights:
        weights[0] = 0.0
    return weights


def examples_to_dataset(examples: Sequence[TokenizedExample], policy: LossPolicy, *, description: str = ""):
    """A `datasets.Dataset` with one row per example (columns in the module docstring)."""
    from datasets import Dataset, DatasetInfo

    columns: dict[str, list] = {
        "input_ids": [],
        "labels": [],
        "loss_weights": [],
        "roles": [],
        "turns": [],
        "last_response_turn": [],
        "source": [],
    }
    for ex in examples:
        weights = example_weights(ex, policy)
        columns["input_ids"].append(list(ex.input_ids))
        columns["labels"].append([t if w > 0 else IGNORE_INDEX for t, w in zip(ex.input_ids, weights)])
        columns["loss_weights"].append(weights)
        columns["roles"].append([r.value for r in ex.roles])
        columns["turns"].append(list(ex.turns))
        columns["last_response_turn"].append(ex.last_response_turn)  # set when truncation cut the example
        columns["source"].append(ex.source)
    if any(w not in (0.0, 1.0) for weights in columns["loss_weights"] for w in weights):
        # labels would say 1 where the policy says 0.1, and a Trainer that drops loss_weights (its default) would
        # train that silently: without labels it stops at the collator with the reason
        del columns["labels"]
    return Dataset.from_dict(columns, info=DatasetInfo(description=description))


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass
class DataCollator:
    """Batches for transformers' `Trainer`, TRL's `SFTTrainer` or your own loop.

    Returns `input_ids`, `labels` (-100 where a token carries no loss), `attention_mask` and
    `position_ids`; with `return_loss_weights=True` also `loss_weights` (for fractional weights,
    which labels cannot express: use `deltatune.WeightedLossTrainer` or `deltatune.weighted_loss`).

    - `policy`: None uses each feature's `loss_weights` (else its `labels`), i.e. the policy the
      dataset was prepared with. A policy name re-weights from the features' `roles`, which
      transformers' Trainer drops unless `remove_unused_columns=False`.
    - `packing=True`: the batch's examples are packed into rows of at most `max_length` tokens
      (best fit), with the block-diagonal mask and per-example position ids; rows are padded to
      the longest row. `packing=False`: one example per row, right-padded to the longest, with the
      usual [B, T] 0/1 attention mask. `max_length` there only checks lengths (truncate with
      `deltatune.prepare(max_len=...)`).
    - `config`: the model's config, needed with `packing=True` on a sliding-window model (Mistral,
      Phi3, Gemma2/3) whose rows can be longer than its window: transformers uses a packed 4D mask as
      given, so the window must be in it (for Gemma2/3, one mask per layer type). Without it, packed rows
      are masked for full attention.
    """

    tokenizer: Any = None
    policy: str | LossPolicy | None = None
    packing: bool = False
    max_length: int | None = None
    return_loss_weights: bool = False
    pad_token_id: int | None = None
    config: Any = None

    def __post_init__(self) -> None:
        self._policy = single_policy(self.policy) if self.policy is not None else None
        if self.pad_token_id is None:
            tok = self.tokenizer
            pad = getattr(tok, "pad_token_id", None)
            self.pad_token_id = pad if pad is not None else getattr(tok, "eos_token_id", None)
        if self.pad_token_id is None:
            raise ConfigError("the tokenizer has neither a pad nor an EOS token; pass pad_token_id", field="tokenizer")
        if self.packing and self.max_length is None:
            raise ConfigError("packing needs max_length (the length of a packed row, in tokens)", field="max_length")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2, got {self.max_length}", field="max_length")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        examples = [self._example(f, i) for i, f in enumerate(features)]
        if not examples:
            raise DataError("empty batch")
        longest = max(len(ex) for ex in examples)
        if self.packing:
            rows: list = pack_examples(examples, self.max_length)
            seq_len = max(sum(len(ex) for ex in row) for row in rows)
        else:
            if self.max_length is not None and longest > self.max_length:
                raise DataError(
                    f"an example has {longest} tokens, more than max_length {self.max_length}; "
                    "prepare the data with max_len <= max_length",
                    field="max_length",
                )
            rows, seq_len = examples, longest
        layout = dict(seq_len=seq_len, pad_id=self.pad_token_id, packed=self.packing, **self._window(seq_len))
        if self._policy is not None:
            batch = collate(rows, self._policy, **layout)
        else:  # the features' own weights, laid out exactly where collate puts each example
            batch = collate(rows, _LAYOUT_POLICY, **layout)
            batch["loss_weights"] = self._given_weights(rows, batch["loss_weights"].shape)
        weights = batch["loss_weights"]
        if not bool((weights > 0).any()):
            raise DataError("no token in this batch carries loss (check the policy, the template and truncation)")
        fractional = (weights != 0) & (weights != 1)
        if fractional.any() and not self.return_loss_weights:
            raise ConfigError(
                "this batch has fractional loss weights, which labels cannot express; pass "
                "return_loss_weights=True and train with deltatune.WeightedLossTrainer (or "
                "deltatune.weighted_loss in your own loop)",
                field="return_loss_weights",
            )
        out = {
            "input_ids": batch["input_ids"],
            "labels": batch["input_ids"].masked_fill(weights == 0, IGNORE_INDEX),
            "attention_mask": _additive(batch["attention_mask"]) if self.packing else batch["attention_mask"],
            "position_ids": batch["position_ids"],
        }
        if self.return_loss_weights:
            out["loss_weights"] = weights
        return out

    def _window(self, seq_len: int) -> dict[str, Any]:
        """collate's sliding-window arguments for packed rows of `seq_len` tokens (none without packing)."""
        if not self.packing or self.config is None:
            return {}
        from deltatune.train.packed_attention import sliding_window_of

        window, every_layer = sliding_window_of(self.config)
        if window is None or window >= seq_len:
            return {}
        return {"window": window, "window_layers": "all" if every_layer else "some"}

    def _example(self, feature: dict[str, Any], index: int) -> TokenizedExample:
        if "input_ids" not in feature:
            raise DataError(
                f"feature {index} has no 'input_ids'; prepare the data with deltatune.prepare", field="input_ids"
            )
        ids = [int(t) for t in _as_list(feature["input_ids"])]
        n = len(ids)
        roles, turns = feature.get("roles"), feature.get("turns")
        if self._policy is not None and roles is None:
            raise DataError(
                "DataCollator(policy=...) needs the 'roles' column that deltatune.prepare writes; "
                "transformers' Trainer drops columns the model does not take, so pass "
                "remove_unused_columns=False, or use policy=None to keep the dataset's own weights",
                field="roles",
            )
        ex = TokenizedExample(
            input_ids=ids,
            roles=[Role(r) for r in roles] if roles is not None else [Role.RESPONSE] * n,
            turns=[int(t) for t in _as_list(turns)] if turns is not None else [0] * n,
            source=str(feature.get("source") or f"feature {index}"),
            # `turns=last` trains the record's last answer, not the last one truncation left
            last_response_turn=_optional_int(feature.get("last_response_turn")),
        )
        if len(ex.roles) != n or len(ex.turns) != n:
            raise DataError(f"'roles' or 'turns' of {ex.source} do not match its {n} input_ids", field="roles")
        if self._policy is None:
            if self.return_loss_weights and feature.get("loss_weights") is None:
                raise DataError(
                    "return_loss_weights=True needs the 'loss_weights' column that deltatune.prepare "
                    "writes, or a policy and 'roles'; transformers' Trainer drops both unless "
                    "remove_unused_columns=False (deltatune.WeightedLossTrainer keeps them)",
                    field="loss_weights",
                )
            ex.weights = self._feature_weights(feature, ex)
        return ex

    @staticmethod
    def _feature_weights(feature: dict[str, Any], ex: TokenizedExample) -> list[float]:
        if feature.get("loss_weights") is not None:
            weights = [float(w) for w in _as_list(feature["loss_weights"])]
        elif feature.get("labels") is not None:
            weights = [0.0 if int(t) == IGNORE_INDEX else 1.0 for t in _as_list(feature["labels"])]
        else:
            raise DataError(
                f"{ex.source} has neither 'loss_weights' nor 'labels': data prepared with fractional weights "
                "(weighted:λ) has no labels, which cannot express them, and transformers' Trainer drops "
                "loss_weights unless remove_unused_columns=False (deltatune.WeightedLossTrainer keeps it); "
                "otherwise prepare the data with deltatune.prepare",
                field="labels",
            )
        if len(weights) != len(ex):
            raise DataError(f"the weights of {ex.source} do not match its {len(ex)} input_ids", field="loss_weights")
        if weights:
            weights[0] = 0.0
        return weights

    @staticmethod
    def _given_weights(rows: list, shape: torch.Size) -> torch.Tensor:
        out = torch.zeros(shape, dtype=torch.float32)
        for b, row in enumerate(rows):
            offset = 0
            for ex in row if isinstance(row, list) else [row]:
                out[b, offset : offset + len(ex)] = torch.as_tensor(ex.weights, dtype=torch.float32)
                offset += len(ex)
        return out


def _as_list(value: Any) -> list:
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _additive(mask: Any) -> Any:
    """The packed mask as the additive mask transformers adds to its scores; per layer type for a mapping."""
    if isinstance(mask, dict):
        return {kind: additive_mask(m) for kind, m in mask.items()}
    return additive_mask(mask)
