"""Pack examples into fixed-length rows, and collate rows or examples into model-ready tensors.

Packed rows never let one example see another: each row gets a block-diagonal causal boolean
mask [B, 1, T, T] and position ids that restart at 0 per example. Position ids alone are not
enough under SDPA (measured: the second example's logits moved by up to 0.70), the 4D mask is.

`loss_weights[b, t]` is the weight of token t as a prediction target; the consumer compares
logits[:, :-1] with input_ids[:, 1:] weighted by loss_weights[:, 1:]. The first token of every
example weighs 0: in a packed row it would otherwise be "predicted" from the previous example.
"""

from __future__ import annotations

import random
from bisect import bisect_left, insort
from functools import lru_cache
from typing import Any, Callable, Sequence

import torch

from deltatune.data.masking import LossPolicy, policy_weights
from deltatune.data.segments import TokenizedExample
from deltatune.errors import ConfigError, TrainingError

# A flat row's length is rounded up to a multiple of this. The CPU matmul library (oneDNN) builds
# and caches a kernel per shape: with every length distinct, a run keeps building kernels and its
# resident memory grew by ~10 MB a step (measured); 32 leaves a few dozen shapes for ~2% padding.
FLAT_MULTIPLE = 32


def pack_examples(
    examples: Sequence[TokenizedExample], seq_len: int, shuffle_seed: int | None = None
) -> list[list[TokenizedExample]]:
    """Greedy best-fit packing: each example goes into the open row with the least room that fits it.

    With `shuffle_seed` the examples are shuffled first (so rows mix lengths and sources);
    without it their order is kept, which makes packing deterministic for tests and previews.
    """
    order = list(range(len(examples)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    rows: list[list[TokenizedExample]] = []
    room: list[tuple[int, int]] = []  # sorted (free tokens, row index) of rows that still have room
    for i in order:
        ex = examples[i]
        n = len(ex)
        if n > seq_len:
            raise ConfigError(
                f"example {ex.source or i} has {n} tokens, more than the packed row length {seq_len}; "
                "prepare the data with max_len <= seq_len",
                field="--seq-len",
            )
        j = bisect_left(room, (n, -1))
        if j < len(room):
            free, r = room.pop(j)
        else:
            free, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(ex)
        if free - n > 0:
            insort(room, (free - n, r))
    return rows


def collate(
    rows_or_examples: Sequence[Any],
    policy: LossPolicy,
    *,
    seq_len: int,
    pad_id: int,
    packed: bool,
    template_name: str = "",
    flat: bool = False,
    weights_of: Callable[[TokenizedExample], Sequence[float]] | None = None,
    window: int | None = None,
    window_layers: str = "all",
) -> dict:
    """Tensors for one batch.

    packed=True: `rows_or_examples` is a list of rows (lists of examples), each padded to `seq_len`;
    attention_mask is bool [B, 1, T, T] (True = may attend), block-diagonal and causal; a padding
    token attends to itself only, so no softmax row is empty.
    packed=True, flat=True: the same rows laid end to end in ONE row ([1, T]), padded only up to the
    next multiple of FLAT_MULTIPLE tokens; attention_mask is None, and position ids (restarting at 0
    per example, and for the padding) are what keeps the examples apart: for attention that works
    span by span (train/packed_attention.py).
    packed=False: a list of examples, right-padded to the longest (at most `seq_len`); attention_mask
    is the usual long [B, T] 0/1 mask.
    token_mask is bool [B, T], True at the examples' tokens and False at the padding, in every layout.
    `weights_of(example)` gives the weights instead of `policy` (evaluation of examples already weighted).
    `window`: the packed mask also keeps each token to the `window` tokens up to itself (a model whose every
    layer slides: transformers uses a 4D mask as given, so the window must be in it). `window_layers="some"`
    (Gemma2/3: sliding and full layers): attention_mask is transformers' per-layer-type mapping,
    {"full_attention": the block mask, "sliding_attention": it with the window}.
    Raises TrainingError if no token in the batch carries loss under `policy`.
    """
    rows = [list(r) for r in rows_or_examples] if packed else [[ex] for ex in rows_or_examples]
    if not rows:
        raise TrainingError("empty batch")
    lengths = [sum(len(ex) for ex in row) for row in rows]
    longest = max(lengths)
    if longest > seq_len:
        raise ConfigError(f"a batch row has {longest} tokens, more than seq_len {seq_len}", field="--seq-len")
    if packed and flat:
        rows, lengths = [[ex for row in rows for ex in row]], [sum(lengths)]
    T = -(-lengths[0] // FLAT_MULTIPLE) * FLAT_MULTIPLE if packed and flat else seq_len if packed else longest
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    weights = torch.zeros((B, T), dtype=torch.float32)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.empty((B, T), dtype=torch.long)
    n_examples = 0
    for b, row in enumerate(rows):
        off = 0
        for k, ex in enumerate(row):
            n = len(ex)
            w = list(weights_of(ex)) if weights_of else policy_weights(ex, policy)
            w[0] = 0.0  # nothing of this example precedes its first token
            ids[b, off : off + n] = torch.as_tensor(ex.input_ids, dtype=torch.long)
            weights[b, off : off + n] = torch.as_tensor(w, dtype=torch.float32)
            pos[b, off : off + n] = torch.arange(n)
            seg[b, off : off + n] = k
            off += n
            n_examples += 1
        if off < T:
            pos[b, off:] = torch.arange(T - off)
            seg[b, off:] = -1 - torch.arange(off, T)  # every padding token is its own block
    if not float(weights.sum()) > 0.0:
        raise TrainingError(
            f"no token in this batch carries loss under policy '{policy}' with template "
            f"'{template_name or '?'}' (sources: {', '.join(ex.source for row in rows for ex in row[:2])}); "
            "check the template's markers and the policy, or truncation that cut every response"
        )
    if packed and flat:
        attention_mask = None
    elif packed:
        mask = seg[:, :, None] == seg[:, None, :]
        mask &= _causal(T)
        if window is None:
            attention_mask = mask[:, None]
        elif window_layers == "all":
            attention_mask = (mask & ~_causal(T).tril(-window))[:, None]  # i - j < window
        else:
            attention_mask = {
                "full_attention": mask[:, None],
                "sliding_attention": (mask & ~_causal(T).tril(-window))[:, None],
            }
    else:
        attention_mask = (seg >= 0).long()
    return {
        "input_ids": ids,
        "loss_weights": weights,
        "position_ids": pos,
        "attention_mask": attention_mask,
        "token_mask": seg >= 0,  # real tokens (upcycled MoE blocks route only these)
        "n_real_tokens": int(sum(lengths)),
        "n_examples": n_examples,
    }


def additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean [B, 1, T, T] mask (True = may attend) as float32 0 / float32 minimum: eager attention adds its
    mask to the scores, so a boolean one (0/1 added) would mask nothing."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
        ~mask, torch.finfo(torch.float32).min
    )


@lru_cache(maxsize=8)
def _causal(T: int) -> torch.Tensor:
    return torch.ones((T, T), dtype=torch.bool).tril_()


def padding_waste(
    examples: Sequence[TokenizedExample], seq_len: int, batch_size: int, shuffle_seed: int | None = None
) -> dict:
    """Fraction of computed positions that are padding: packed rows vs batches padded to their longest.

    Padded batches take the examples in the given order, `batch_size` at a time.
    """
    real = sum(len(ex) for ex in examples)
    rows = pack_examples(examples, seq_len, shuffle_seed=shuffle_seed)
    packed_slots = len(rows) * seq_len
    padded_slots = sum(
        len(examples[i : i + batch_size]) * max(len(ex) for ex in examples[i : i + batch_size])
        for i in range(0, len(examples), batch_size)
    )
    return {
        "real_tokens": real,
        "packed_rows": len(rows),
        "packed_slots": packed_slots,
        "packed_waste": 1 - real / packed_slots if packed_slots else 0.0,
        "padded_batches": -(-len(examples) // batch_size),
        "padded_slots": padded_slots,
        "padded_waste": 1 - real / padded_slots if padded_slots else 0.0,
    }
