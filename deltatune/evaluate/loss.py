"""Held-out loss and perplexity with the training data path's templates and loss policies.

Token-weighted: loss = sum_t w_t * nll_t / sum_t w_t over the whole file (not a mean of per-batch
means), where w_t is the loss policy's weight of target token t (response-only by default), so the
number is the one training minimises and perplexity = exp(loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from deltatune.data.segments import TokenizedExample
from deltatune.errors import DataError
from deltatune.train.loss import weighted_lm_loss_sum


@dataclass
class LossResult:
    loss: float
    perplexity: float
    tokens: float  # sum of weights (the number of loss-bearing tokens for 0/1 policies)
    examples: int

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens, "examples": self.examples}


@torch.no_grad()
def heldout_loss(
    model, examples: list[TokenizedExample], batch_size: int = 8, pad_id: int = 0, progress: bool = True
) -> LossResult:
    """Weighted mean next-token NLL; `weights[t]` weighs token t as a target (t >= 1)."""
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
    total, weight_sum = 0.0, 0.0
    bar = tqdm(total=len(examples), desc="loss", unit="ex", disable=not progress or len(examples) < 2)
    for start in range(0, len(order), batch_size):
        batch = [examples[i] for i in order[start : start + batch_size]]
        width = max(len(ex) for ex in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        w = torch.zeros((len(batch), width), dtype=torch.float64)
        for r, ex in enumerate(batch):
            if ex.weights is None:
                raise DataError("example has no loss weights (apply a loss policy first)", file=ex.source or None)
            n = len(ex)
            ids[r, :n] = torch.tensor(ex.input_ids)
            attn[r, :n] = 1
            w[r, :n] = torch.tensor(ex.weights, dtype=torch.float64)
        # final hidden states, then the chunked head: logits exist only for loss-bearing positions
        hidden = model.get_decoder()(
            input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False
        ).last_hidden_state
        s, tw = weighted_lm_loss_sum(hidden, model.get_output_embeddings(), ids.to(device), w.to(device))
        total += float(s)
        weight_sum += float(tw)
        bar.update(len(batch))
    bar.close()
    if weight_sum <= 0:
        raise DataError("no loss-bearing tokens in the evaluation data (check the loss policy and template)")
    loss = total / weight_sum
    return LossResult(loss, math.exp(min(loss, 700.0)), weight_sum, len(examples))


def loss_on_file(
    model,
    tokenizer,
    path,
    *,
    template: str = "chatml",
    policy: str = "response",
    data_format: str = "auto",
    column_map: dict[str, str] | str | None = None,
    max_len: int = 1024,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> LossResult:
    """Held-out loss of a data file, read, templated and weighted exactly as training reads it."""
    from deltatune.data.masking import LossPolicy, parse_policy, policy_weights
    from deltatune.data.pipeline import prepare_dataset
    from deltatune.errors import ConfigError

    parsed = parse_policy(policy)
    if not isinstance(parsed, LossPolicy):
        raise ConfigError("evaluation takes one loss policy, not a two-phase schedule", field="policy")
    prepared = prepare_dataset(
        path, tokenizer, template=template, data_format=data_format, column_map=column_map, max_len=max_len, limit=limit
    )
    for ex in prepared.examples:
        ex.weights = policy_weights(ex, parsed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return heldout_loss(model, prepared.examples, batch_size=batch_size, pad_id=pad, progress=progress)
