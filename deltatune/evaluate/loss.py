"""Held-out loss and perplexity with the training data path's templates and loss policies.

Token-weighted: loss = sum_t w_t * nll_t / sum_t w_t over the whole file (not a mean of per-batch
means), where w_t is the loss policy's weight of target token t (response-only by default), so the
number is the one training minimises and perplexity = exp(loss).

On CPU the examples of a batch are laid end to end in one row, without padding, and attention runs example by
example (train/packed_attention.py, as training computes it): padding a batch of self-instruct answers to its
longest made 40% of its tokens padding, and masked SDPA is slow on CPU (docs/evaluation.md, "Losses and options
in one unpadded row": 1.96x faster in bf16 on those answers).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from deltatune.data.packing import collate
from deltatune.data.segments import TokenizedExample
from deltatune.errors import DataError, TrainingError
from deltatune.methods.virtual_tokens import has_virtual_tokens, prepended_tokens
from deltatune.train import packed_attention
from deltatune.train.loss import logit_transform, weighted_lm_loss_sum
from deltatune.upcycle.moe import moe_blocks, routed_tokens


@dataclass
class LossResult:
    loss: float
    perplexity: float
    tokens: float  # sum of weights (the number of loss-bearing tokens for 0/1 policies)
    examples: int
    read: int = 0  # records read (loss_on_file); the counts below change the score, so results report them
    truncated: int = 0  # scored examples cut to max_len tokens
    dropped: int = 0  # examples with no loss-bearing token left under the policy (after truncation)
    template: str = ""  # the resolved template (auto -> ...)

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens, "examples": self.examples}

    def note(self, max_len: int) -> str | None:
        """One line on what --max-len did to the file, or None when it did nothing."""
        if not self.truncated and not self.dropped:
            return None
        return (
            f"{self.truncated} of {self.read} examples truncated to --max-len {max_len} tokens, {self.dropped} "
            "dropped (no loss-bearing token left under the policy)"
        )


def flat_rows_available(model) -> bool:
    """Whether examples can share a row: attention through transformers' AttentionInterface, no virtual tokens
    (prompt and prefix tuning give every sequence its own extra positions)."""
    return packed_attention.supported(model) and not has_virtual_tokens(model)


@torch.no_grad()
def heldout_loss(
    model,
    examples: list[TokenizedExample],
    batch_size: int = 8,
    pad_id: int = 0,
    progress: bool = True,
    flat: bool | None = None,
) -> LossResult:
    """Weighted mean next-token NLL; `weights[t]` weighs token t as a target (t >= 1).

    `flat`: each batch's examples in one unpadded row with attention span by span; None (auto) does so on CPU
    where the model allows it (on CUDA, SDPA's fused kernels with a padding mask are the fast path)."""
    device = next(model.parameters()).device
    for ex in examples:
        if ex.weights is None:
            raise DataError("example has no loss weights (apply a loss policy first)", file=ex.source or None)
    if flat is None:
        flat = device.type == "cpu" and flat_rows_available(model)
    elif flat and not flat_rows_available(model):
        raise ValueError(
            "this model cannot take examples end to end in one row (virtual tokens or no AttentionInterface)"
        )
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
    total, weight_sum = 0.0, 0.0
    moe = [b for _, b in moe_blocks(model)]  # upcycled models route the real tokens only
    virtual = prepended_tokens(model)  # ... and prompt tuning's virtual ones
    head, transform = model.get_output_embeddings(), logit_transform(model)  # Gemma2's cap, Cohere's scale
    bar = tqdm(total=len(examples), desc="loss", unit="ex", disable=not progress or len(examples) < 2)
    with packed_attention.switched(model) if flat else nullcontext():
        for start in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[start : start + batch_size]]
            bar.update(len(batch))
            try:  # one flat row of all the batch's examples, or right-padded rows with a 0/1 mask
                tensors = collate(
                    [batch] if flat else batch,
                    None,
                    seq_len=sum(len(ex) for ex in batch),
                    pad_id=pad_id,
                    packed=flat,
                    flat=flat,
                    weights_of=lambda ex: ex.weights,
                )
            except TrainingError:
                continue  # no loss-bearing token in this batch: it adds nothing
            kwargs = {"input_ids": tensors["input_ids"].to(device)}
            if flat:
                kwargs["position_ids"] = tensors["position_ids"].to(device)
                kwargs["packed_spans"] = packed_attention.spans_from_position_ids(kwargs["position_ids"])
            else:
                kwargs["attention_mask"] = tensors["attention_mask"].to(device)
            # final hidden states, then the chunked head: logits exist only for loss-bearing positions
            with routed_tokens(moe, tensors["token_mask"].to(device), virtual):
                hidden = model.get_decoder()(**kwargs, use_cache=False).last_hidden_state
            weights = tensors["loss_weights"].to(device)
            s, tw = weighted_lm_loss_sum(hidden, head, kwargs["input_ids"], weights, transform=transform)
            total += float(s)
            weight_sum += float(tw)
    bar.close()
    if weight_sum <= 0:
        raise DataError("no loss-bearing tokens in the evaluation data (check the loss policy and template)")
    loss = total / weight_sum
    return LossResult(loss, math.exp(min(loss, 700.0)), weight_sum, len(examples))


def loss_options(policy: str, template: str, max_len: int):
    """The one LossPolicy a held-out loss takes, with `template` and `max_len` checked: what `loss_on_file` would
    refuse, found without a tokenizer or model (the eval CLIs call it before the model loads)."""
    from deltatune.data.masking import LossPolicy, parse_policy
    from deltatune.data.templates import TEMPLATES
    from deltatune.errors import ConfigError

    parsed = parse_policy(policy)
    if not isinstance(parsed, LossPolicy):
        raise ConfigError("evaluation takes one loss policy, not a two-phase schedule", field="--policy")
    if template not in TEMPLATES:
        raise ConfigError(f"unknown template '{template}' (choose from {', '.join(TEMPLATES)})", field="--template")
    if max_len < 2:
        raise ConfigError(f"max_len must be at least 2, got {max_len}", field="--max-len")
    return parsed


def loss_on_file(
    model,
    tokenizer,
    path,
    *,
    template: str = "auto",
    policy: str = "response",
    data_format: str = "auto",
    column_map: dict[str, str] | str | None = None,
    max_len: int = 1024,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    flat: bool | None = None,
) -> LossResult:
    """Held-out loss of a data file, read, templated and weighted exactly as training reads it."""
    from deltatune.data.masking import policy_weights
    from deltatune.data.pipeline import prepare_dataset

    parsed = loss_options(policy, template, max_len)
    # an example whose response truncation cut off still has loss-bearing prompt tokens under `--policy all`: the
    # policy's weights, not the response role, decide what is dropped
    prepared = prepare_dataset(
        path,
        tokenizer,
        template=template,
        data_format=data_format,
        column_map=column_map,
        max_len=max_len,
        limit=limit,
        keep_without_response=True,
    )
    scored = []
    for ex in prepared.examples:
        ex.weights = policy_weights(ex, parsed)
        if any(w > 0 for w in ex.weights[1:]):  # the first token is never a target
            scored.append(ex)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    res = heldout_loss(model, scored, batch_size=batch_size, pad_id=pad, progress=progress, flat=flat)
    res.read = prepared.report.read
    res.truncated = sum(bool(ex.truncated) for ex in scored)
    res.dropped = prepared.report.dropped_no_loss + len(prepared.examples) - len(scored)
    res.template = prepared.template
    return res
