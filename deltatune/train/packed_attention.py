"""Attention for packed rows, computed example by example: never across examples, and no work on
the masked-out blocks of the row.

A 4D block-diagonal mask keeps packed examples apart (and remains the fallback), but SDPA then
scores every (query, key) pair of the whole row, and on CPU its masked kernels are slow. Here each
example's span gets its own causal attention; for the short spans of instruction data (a few
hundred tokens) plain bf16 matmuls with an fp32 softmax beat the fused kernels on CPU
(`benchmarks/attention_speed.py`).

It plugs in through transformers' public `AttentionInterface` / `AttentionMaskInterface`
registries (no patching): a model switched to `packed_eager` receives the spans as the
`packed_spans` keyword, which transformers forwards from the model call to every attention layer.
Without spans (generation, evaluation of padded batches) it is transformers' own SDPA.
"""

from __future__ import annotations

import torch

NAME = "packed_eager"
_registered = False

Spans = list[list[tuple[int, int]]]


def spans_from_position_ids(position_ids: torch.Tensor) -> Spans:
    """[(start, end), ...] per row: an example starts wherever the position id restarts at 0."""
    spans = []
    for row in position_ids.tolist():
        starts = [i for i, p in enumerate(row) if p == 0 or i == 0]
        spans.append(list(zip(starts, starts[1:] + [len(row)])))
    return spans


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """softmax(q k^T * scaling + causal) v for one example: q [1, h, n, d], k/v [1, h_kv, n, d]."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    n = q.shape[2]
    scores = torch.matmul(q, k.transpose(-1, -2))
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scaling  # softmax in >= fp32
    future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
    probs = scores.masked_fill_(future, float("-inf")).softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


def packed_eager(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                 dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                 packed_spans: Spans | None = None, **kwargs):
    """query/key/value: [batch, heads, tokens, head_dim]. Returns ([batch, tokens, heads, head_dim], None)
    like transformers' attention functions."""
    if packed_spans is None or (dropout and module.training):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if packed_spans is not None:
            raise ValueError("packed attention does not implement attention dropout; use the 4D mask path")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    rows = []
    for b, spans in enumerate(packed_spans):
        parts = [causal_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e], scaling)
                 for s, e in spans]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def is_active(model) -> bool:
    """Whether `model` is a transformers model switched to packed attention (wrappers such as DDP
    hand the batch to the model inside, which converts the mask itself)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == NAME


def _no_mask(*args, **kwargs):
    return None  # the spans replace the mask


def register() -> str:
    """Register the attention function with transformers (once); returns its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface, AttentionMaskInterface

        AttentionInterface.register(NAME, packed_eager)
        AttentionMaskInterface.register(NAME, _no_mask)
        _registered = True
    return NAME
