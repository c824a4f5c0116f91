"""Attention for packed examples, computed example by example: never across examples, no work on
the masked-out blocks, and no padding.

A 4D block-diagonal mask keeps packed examples apart (and remains the fallback), but SDPA then
scores every (query, key) pair of the whole row and pads every row to the same length; on CPU its
masked bf16 kernels run at about a fifth of the matmul peak. Here the examples of a micro-batch sit
end to end in one row without padding (`collate(..., flat=True)`), and each example's span gets
its own causal attention from a handful of batched matmuls (`SpanAttention`), 2.9x faster than
masked SDPA per layer for GSM8K-sized examples on this CPU (docs/benchmarks.md). Long spans go by blocks of
query rows, each against only the keys it can see, which skips most of the masked upper triangle.

Numerics are those of transformers' eager attention under bf16 autocast: scores and probabilities
are rounded to the compute dtype, the softmax itself accumulates in float32. In float32 or float64
it equals the mask path to rounding (tests/test_packed_attention.py).

On CUDA in 16-bit precision the spans go to PyTorch's variable-length flash attention instead (`varlen_attn`,
one kernel for the whole batch, given the spans as cumulative offsets): the loop of small matmuls suits a CPU,
where each costs microseconds, not a GPU, where each is a kernel launch.

It plugs in through transformers' public `AttentionInterface` / `AttentionMaskInterface`
registries (no patching): a model switched to `packed_eager` receives the spans as the
`packed_spans` keyword, which transformers forwards from the model call to every attention layer.
Without spans (generation, evaluation of padded batches) it is transformers' own SDPA.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from deltatune.train.workspace import Workspace

try:  # PyTorch's variable-length flash attention (2.9+; CUDA): every span of the batch in one kernel
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:
    _varlen_attn = None

NAME = "packed_eager"
COMPILED_NAME = "packed_eager_outside_graph"  # the same function, for decoder layers under torch.compile
_registered = False

Spans = list[list[tuple[int, int]]]


def spans_from_position_ids(position_ids: Tensor) -> Spans:
    """[(start, end), ...] per row: an example starts wherever the position id restarts at 0."""
    spans = []
    for row in position_ids.tolist():
        starts = [i for i, p in enumerate(row) if p == 0 or i == 0]
        spans.append(list(zip(starts, starts[1:] + [len(row)])))
    return spans


_future: dict[tuple, Tensor] = {}


def future_mask(n: int, dtype: torch.dtype, device: torch.device, window: int | None = None) -> Tensor:
    """[n, n] additive causal mask (-inf above the diagonal): a view of one cached square that grows as
    needed. Adding it is ~4x faster on CPU than masked_fill_ with a broadcast boolean mask.

    `window`: a sliding window as transformers' (Mistral, Qwen2, Gemma2, Phi3): query i sees keys j with
    i - window < j <= i, so -inf also at and below the window-th diagonal under the main one."""
    square = _future.get((dtype, device, window))
    if square is None or square.shape[0] < n:
        size = max(n, 256 if square is None else 2 * square.shape[0])
        square = torch.full((size, size), float("-inf"), dtype=dtype, device=device).triu_(1)
        if window is not None:
            square += torch.full_like(square, float("-inf")).tril_(-window)
        _future[(dtype, device, window)] = square
    return square[:n, :n]


workspace = Workspace()  # span-sized temporaries (train/workspace.py)


def _take(name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    return workspace.take(name, shape, like.dtype, like.device)


# Span lengths are rounded up to a multiple of this inside the kernel (the extra rows are zeros that
# no real token attends to): the CPU matmul library builds a kernel per shape, and a few dozen
# shapes instead of one per example length keep that cache small and warm (see FLAT_MULTIPLE).
TILE = 32

# Spans longer than WHOLE_SPAN rows take their query rows QUERY_BLOCK at a time (multiples of TILE), each
# block against only the keys at or before its last row: causal attention needs no scores above the
# diagonal, and c blocks cost (c + 1) / 2c of the full square in every product, the softmax and the mask.
# Measured on this project's CPU (docs/benchmarks.md, "Span attention by query blocks"): forward and
# backward 1.15x faster at 384 tokens, 1.2x at 512, 1.55-1.75x from 1,024 to 4,096; at 256 and below the
# extra launches cost more than the skipped quarter saves (0.94x), so shorter spans stay whole.
WHOLE_SPAN = 256
QUERY_BLOCK = 128

# Spans of up to KEEP_PROBABILITIES rows (tiled; whole spans only) keep their attention probabilities from
# forward to backward instead of recomputing them there: a product, the mask and the softmax less a span in
# backward, bitwise the same gradients, for heads * m * m more numbers saved a span (at most heads * 256 a
# token a layer, whatever the example's length). Measured on an AMX Xeon (docs/benchmarks.md): the kernel
# 1.25x, a LoRA step of the default model 1.01-1.05x for 70-90 MiB more peak RSS. 0 recomputes every span.
KEEP_PROBABILITIES = 256


def _tiled(name: str | None, x: Tensor, n: int, m: int, scale: float | None = None) -> Tensor:
    """x [A, B, n, D] copied (times `scale`, if given, in the same pass) into a contiguous [A, B, m, D] whose last
    m - n rows are zero: workspace buffer `name`, or a tensor of its own (kept for backward) when `name` is None."""
    a, b, _, d = x.shape
    out = x.new_empty(a, b, m, d) if name is None else _take(name, (a, b, m, d), x)
    if scale is None:
        out[:, :, :n].copy_(x)
    else:
        torch.mul(x, scale, out=out[:, :, :n])
    if m > n:
        out[:, :, n:].zero_()
    return out


def _query_blocks(m: int) -> list[tuple[int, int]]:
    """[(first row, end row), ...] of a span tiled to m rows: the whole span, or QUERY_BLOCK rows at a time."""
    step = m if m <= WHOLE_SPAN else QUERY_BLOCK
    return [(r, min(r + step, m)) for r in range(0, m, step)]


def _probabilities(
    q_scaled: Tensor, k_keys: Tensor, groups: int, first_row: int, keep: bool = False, window: int | None = None
) -> Tensor:
    """softmax(q k^T + causal mask) for one block of query rows, q_scaled [KV, G*c, D] (already scaled; rows
    first_row .. first_row + c of the span for each of the G query heads), k_keys [KV, e, D] the keys up to
    the block's last row (e = first_row + c): [KV, G*c, e]. The query heads that share a key/value head
    are stacked along rows, so grouped-query attention needs no copy of the keys and values. `keep`: in a
    tensor of their own (kept for backward) instead of the workspace buffer that the next span reuses.
    `window`: a sliding window (see `future_mask`), or None for plain causal attention."""
    kv_heads, e = k_keys.shape[0], k_keys.shape[1]
    c = e - first_row
    scores = _take("scores", (kv_heads, groups * c, e), q_scaled)
    torch.bmm(q_scaled, k_keys.transpose(1, 2), out=scores)
    scores.view(kv_heads, groups, c, e).add_(future_mask(e, scores.dtype, scores.device, window)[first_row:])
    probs = torch.empty_like(scores) if keep else _take("probs", scores.shape, q_scaled)
    torch._softmax(scores, -1, False, out=probs)  # float32 accumulation inside, even for bf16
    return probs


def keeps_probabilities(n: int) -> bool:
    """Whether a span of n tokens keeps its probabilities from forward to backward (see KEEP_PROBABILITIES)."""
    return -(-n // TILE) * TILE <= min(KEEP_PROBABILITIES, WHOLE_SPAN)


class _Span:
    """One span's k and v tiled [KV, m, D], and its query rows block by block, grouped [KV, G*c, D] (scaled, as
    PyTorch's reference SDPA does, which saves a pass over the scores).

    A span that keeps its probabilities (`kept`: whole, up to KEEP_PROBABILITIES rows) in a call whose every span
    does (`keep_tiles`) keeps its tiles too, in tensors of their own that backward takes back (`saved`) instead
    of copying q, k and v into tiles again; the tiles then replace q, k and v as what is saved. In other calls
    every span tiles into workspace buffers, in forward and again in backward (keeping tiles beside q, k and v,
    which the other spans need, cost up to 60% more saved memory)."""

    def __init__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        s: int,
        e: int,
        scale: float,
        window: int | None,
        *,
        keep_tiles: bool = False,
        saved: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> None:
        self.n, self.scale = e - s, scale
        self.window = window if window is not None and window < self.n else None  # a wider one changes nothing
        self.m = -(-self.n // TILE) * TILE
        if saved is not None:  # backward of a span that kept its tiles (q, k and v were not saved)
            self.whole_q, self.k, self.v = saved
            self.kv_heads, _, self.dim = self.k.shape
            self.groups = self.whole_q.shape[1] // self.m
            self.kept = True
            return
        heads, _, self.dim = q.shape
        self.kv_heads = k.shape[0]
        self.groups = heads // self.kv_heads
        self.q_rows = q[:, s:e].view(self.kv_heads, self.groups, self.n, self.dim)
        self.kept = keeps_probabilities(self.n)
        own = self.kept and keep_tiles
        k_buffer, v_buffer = (None, None) if own else ("k", "v")  # None: a tensor of its own
        self.k = _tiled(k_buffer, k[:, s:e].unsqueeze(1), self.n, self.m).squeeze(1)
        self.v = _tiled(v_buffer, v[:, s:e].unsqueeze(1), self.n, self.m).squeeze(1)
        self.whole_q = self.rows(None, self.q_rows, 0, self.m, scale) if own else None

    def real_rows(self, r0: int, r1: int) -> int:
        return max(0, min(r1, self.n) - r0)

    def rows(self, name: str | None, x: Tensor, r0: int, r1: int, scale: float | None = None) -> Tensor:
        """Rows r0..r1 of x [KV, G, n, D] as a tiled block [KV, G*(r1 - r0), D] (see `_tiled`)."""
        real = self.real_rows(r0, r1)
        return _tiled(name, x[:, :, r0 : r0 + real], real, r1 - r0, scale).view(self.kv_heads, -1, x.shape[-1])

    def query_block(self, r0: int, r1: int) -> Tensor:
        if self.whole_q is not None:  # a kept span is one block
            return self.whole_q
        return self.rows("q", self.q_rows, r0, r1, self.scale)

    def heads_first(self, x: Tensor, r0: int, r1: int) -> Tensor:
        """A block [KV, G*(r1 - r0), D] -> its real rows as [H, rows, D]."""
        real = self.real_rows(r0, r1)
        return x.view(self.kv_heads, self.groups, r1 - r0, -1)[:, :, :real].reshape(-1, real, x.shape[-1])


class SpanAttention(torch.autograd.Function):
    """Causal attention within each span of one packed row.

    q: [H, T, D], k/v: [KV, T, D]; returns [T, H, D] (the layout the output projection reads).
    Spans up to KEEP_PROBABILITIES rows save their probabilities; the others save nothing of their own, and
    backward recomputes their blocks' probabilities (one more matmul). Where every span keeps its probabilities
    (GSM8K-sized examples), the spans' tiled (scaled) queries, keys and values are saved instead of q, k and v,
    so backward copies none of them again; else q, k and v are saved. So the memory per layer is that of its
    inputs (padded to TILE rows a span in the first case) plus the kept probabilities. Backward is the textbook
    softmax-attention gradient; the key and value gradients sum over the query blocks (the last block, which
    sees every key, first). It is differentiable once (`once_differentiable`): a double backward is refused.
    """

    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, v: Tensor, spans: list[tuple[int, int]], scale: float, window: int | None = None
    ) -> Tensor:
        heads, total, dim = q.shape
        out = q.new_empty(total, heads, dim)
        kept: list[Tensor] = []  # in span order: each kept span's probabilities, after its tiles where kept too
        ctx.keeps = [keeps_probabilities(e - s) for s, e in spans]
        ctx.tiles = all(ctx.keeps)  # every span keeps its tiles, which replace q, k and v as what is saved
        for s, e in spans:
            span = _Span(q, k, v, s, e, scale, window, keep_tiles=ctx.tiles)
            for r0, r1 in _query_blocks(span.m):
                block_q = span.query_block(r0, r1)
                probs = _probabilities(block_q, span.k[:, :r1], span.groups, r0, keep=span.kept, window=span.window)
                if span.kept:
                    kept += [span.whole_q, span.k, span.v, probs] if ctx.tiles else [probs]
                o = torch.bmm(probs, span.v[:, :r1], out=_take("o", block_q.shape, q))
                out[s + r0 : s + r0 + span.real_rows(r0, r1)] = span.heads_first(o, r0, r1).transpose(0, 1)
        ctx.save_for_backward(*(() if ctx.tiles else (q, k, v)), *kept)
        ctx.spans, ctx.scale, ctx.window, ctx.shapes = spans, scale, window, (q.shape, k.shape)
        return out

    @staticmethod
    @once_differentiable  # its products write into buffers (out=): a double backward would be silently wrong
    def backward(ctx, grad_out: Tensor):
        saved = ctx.saved_tensors
        (q, k, v), kept = ((None, None, None), iter(saved)) if ctx.tiles else (saved[:3], iter(saved[3:]))
        q_shape, kv_shape = ctx.shapes
        grad_q, grad_k, grad_v = grad_out.new_empty(q_shape), grad_out.new_empty(kv_shape), grad_out.new_empty(kv_shape)
        for (s, e), keeps in zip(ctx.spans, ctx.keeps):
            if ctx.tiles:
                span = _Span(q, k, v, s, e, ctx.scale, ctx.window, saved=(next(kept), next(kept), next(kept)))
            else:
                span = _Span(q, k, v, s, e, ctx.scale, ctx.window)
            probs = next(kept) if keeps else None
            g_rows = grad_out[s:e].transpose(0, 1).view(span.kv_heads, span.groups, span.n, -1)
            span_grad_k, span_grad_v = _take("grad_k", span.k.shape, grad_out), _take("grad_v", span.k.shape, grad_out)
            for r0, r1 in reversed(_query_blocks(span.m)):
                block_q = span.query_block(r0, r1)
                if probs is None:
                    probs = _probabilities(block_q, span.k[:, :r1], span.groups, r0, window=span.window)
                g = span.rows("g", g_rows, r0, r1)
                if r1 == span.m:  # the first block done sees every key: it writes, the others add
                    torch.bmm(probs.transpose(1, 2), g, out=span_grad_v)
                else:
                    span_grad_v[:, :r1].baddbmm_(probs.transpose(1, 2), g)
                grad_probs = torch.bmm(
                    g, span.v[:, :r1].transpose(1, 2), out=_take("grad_probs", probs.shape, grad_out)
                )
                grad_scores = _take("scores", probs.shape, grad_out)  # the scores are spent: reuse
                torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype, grad_input=grad_scores)
                q_part = torch.bmm(grad_scores, span.k[:, :r1], out=_take("o", block_q.shape, grad_out))
                real = span.real_rows(r0, r1)
                torch.mul(span.heads_first(q_part, r0, r1), ctx.scale, out=grad_q[:, s + r0 : s + r0 + real])
                if r1 == span.m:
                    torch.bmm(grad_scores.transpose(1, 2), block_q, out=span_grad_k)
                else:
                    span_grad_k[:, :r1].baddbmm_(grad_scores.transpose(1, 2), block_q)
                probs = None
            grad_k[:, s:e] = span_grad_k[:, : span.n]
            grad_v[:, s:e] = span_grad_v[:, : span.n]
        return grad_q, grad_k, grad_v, None, None, None


def varlen_usable(query: Tensor) -> bool:
    """Whether PyTorch's variable-length flash attention takes these tensors: NVIDIA CUDA, 16-bit, a head size
    its flash kernels support (a multiple of 8 up to 256), compute capability 8.0 or newer."""
    return (
        _varlen_attn is not None
        and query.is_cuda
        and torch.version.hip is None  # ROCm reports its devices as CUDA: not measured there
        and query.dtype in (torch.float16, torch.bfloat16)
        and query.shape[-1] % 8 == 0
        and query.shape[-1] <= 256
        and torch.cuda.get_device_capability(query.device)[0] >= 8
    )


@functools.lru_cache(maxsize=4)
def _accepted(kernel) -> frozenset[str]:
    """The keyword arguments `varlen_attn` takes: its API moved between releases (2.9 has neither a scale nor
    grouped heads, 2.10 takes is_causal, later ones a window, where (-1, 0) is causal, and enable_gqa)."""
    return frozenset(inspect.signature(kernel).parameters)


_offsets: dict = {}  # the last batch's cumulative offsets on its device (one host-to-device copy a batch)


def _cumulative_offsets(spans: Spans, total: int, device: torch.device) -> tuple[Tensor, int]:
    """The spans of every row, rows end to end, as int32 cumulative offsets on `device`, and the longest span.
    Every layer of a forward gets the same spans object: the copy to the device (which waits for the GPU's
    queue to drain) is made once for it, not once a layer."""
    if _offsets.get("spans") is spans and _offsets.get("key") == (total, device):
        return _offsets["value"]
    starts = [b * total + s for b, row in enumerate(spans) for s, _ in row]
    offsets = torch.tensor([*starts, len(spans) * total], dtype=torch.int32, device=device)
    value = offsets, max(e - s for row in spans for s, e in row)
    _offsets.update(spans=spans, key=(total, device), value=value)  # holds the spans: their id stays theirs
    return value


def varlen_takes_window() -> bool:
    """Whether this PyTorch's `varlen_attn` takes a `window_size` (sliding-window attention)."""
    return _varlen_attn is not None and "window_size" in _accepted(_varlen_attn)


def varlen_attention(
    query: Tensor, key: Tensor, value: Tensor, spans: Spans, scale: float, window: int | None = None
) -> Tensor:
    """query [B, H, T, D], key/value [B, KV, T, D] -> [B, T, H, D] through `varlen_attn`: the rows laid end to
    end, each span one sequence of it (cumulative offsets), causal, grouped-query heads shared in the kernel.
    On a GPU the span loop would launch a dozen small kernels an example a layer; this is one.
    `window`: a sliding window (query i sees keys i - window < j <= i), flash's window_size (window - 1, 0)."""
    batch, heads, total, dim = query.shape
    offsets, longest = _cumulative_offsets(spans, total, query.device)
    accepts = _accepted(_varlen_attn)
    if window is not None and window < longest and "window_size" not in accepts:
        raise ValueError("this PyTorch's varlen_attn takes no sliding window; use the span kernel")
    left = window - 1 if window is not None and window < longest else -1
    options = {"window_size": (left, 0)} if "window_size" in accepts else {"is_causal": True}
    if "scale" in accepts:
        options["scale"] = scale
    elif scale != dim**-0.5:  # the kernel's own scale is dim**-0.5: fold the difference into the queries
        query = query * (scale * dim**0.5)
    if key.shape[1] != heads and "enable_gqa" in accepts:
        options["enable_gqa"] = True
    elif key.shape[1] != heads:  # the key/value heads repeated for the query heads that share them
        key, value = (x.repeat_interleave(heads // x.shape[1], dim=1) for x in (key, value))

    def tokens_first(x: Tensor) -> Tensor:  # [B, heads, T, D] -> [B * T, heads, D]; free for transformers'
        return x.transpose(1, 2).reshape(batch * total, x.shape[1], dim)  # [B, T, heads, D] projections

    out = _varlen_attn(
        tokens_first(query), tokens_first(key), tokens_first(value), offsets, offsets, longest, longest, **options
    )
    return out.view(batch, total, heads, dim)


def span_attention(
    query: Tensor, key: Tensor, value: Tensor, spans: Spans, scale: float, window: int | None = None
) -> Tensor:
    """query [B, H, T, D], key/value [B, KV, T, D] -> [B, T, H, D], attention only within each span (and within
    `window` tokens back, for sliding-window layers): PyTorch's variable-length flash attention where it runs
    (CUDA, 16-bit; with a window only where it takes one), SpanAttention's batched matmuls elsewhere."""
    if varlen_usable(query) and (window is None or varlen_takes_window()):
        return varlen_attention(query, key, value, spans, scale, window)
    if len(spans) == 1:  # the flat layout: one row (squeeze, unlike indexing, costs nothing in backward)
        q, k, v = query.squeeze(0), key.squeeze(0), value.squeeze(0)
        return SpanAttention.apply(q, k, v, spans[0], scale, window).unsqueeze(0)
    return torch.stack(
        [SpanAttention.apply(query[b], key[b], value[b], row, scale, window) for b, row in enumerate(spans)]
    )


def packed_eager(
    module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    packed_spans: Spans | None = None,
    sliding_window: int | None = None,
    **kwargs,
):
    """query/key/value: [batch, heads, tokens, head_dim]. Returns ([batch, tokens, heads, head_dim], None)
    like transformers' attention functions. `sliding_window` (Mistral, Qwen2, Phi3, Gemma2 layers) is honoured;
    score soft-capping (Gemma2's `softcap`) and attention sinks (`s_aux`, `sinks`) are not implemented and are
    refused rather than silently left out (`unsupported_reason` keeps such models on the mask path)."""
    if packed_spans is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            sliding_window=sliding_window,
            **kwargs,
        )
    unsupported = [name for name in _UNSUPPORTED_ARGUMENTS if kwargs.get(name) is not None]
    if unsupported:
        raise ValueError(f"packed attention does not implement {', '.join(unsupported)}; use attention: mask")
    if dropout and module.training:
        raise ValueError("packed attention does not implement attention dropout; use attention: mask")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads do not divide into {key.shape[1]} key/value heads")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # one dtype for all three, as autocast gives SDPA (rotary embeddings in float32 can promote q and k
    # to float32 while v stays bf16, e.g. with float32 weights under bf16 autocast)
    device = query.device.type
    dtype = (
        torch.get_autocast_dtype(device)
        if torch.is_autocast_enabled(device)
        else torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    )
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    return span_attention(query, key, value, packed_spans, scale, sliding_window), None


class HiddenSpans:
    """A batch's spans, opaque to torch.compile: a list of ints passed into a compiled layer would be guarded
    value by value (a recompile for every batch); only the attention, outside the graph, reads them."""

    __slots__ = ("spans",)

    def __init__(self, spans: Spans) -> None:
        self.spans = spans


@torch.compiler.disable
def packed_eager_outside_graph(module, query, key, value, attention_mask, packed_spans=None, **kwargs):
    """`packed_eager` behind a graph break: compiled decoder layers run everything else in their graphs and
    call this eagerly (its loop over examples would otherwise be unrolled and specialised on every length)."""
    spans = packed_spans.spans if isinstance(packed_spans, HiddenSpans) else packed_spans
    return packed_eager(module, query, key, value, attention_mask, packed_spans=spans, **kwargs)


def attention_name(model) -> str | None:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def is_active(model) -> bool:
    """Whether `model` is a transformers model switched to packed attention (either variant)."""
    return attention_name(model) in (NAME, COMPILED_NAME)


def spans_argument(model, position_ids: Tensor) -> Spans | HiddenSpans:
    """The `packed_spans` keyword for a flat batch, hidden from the compiler when the layers are compiled."""
    spans = spans_from_position_ids(position_ids)
    return HiddenSpans(spans) if attention_name(model) == COMPILED_NAME else spans


# keywords some models pass their attention function that change the scores: score soft-capping (Gemma2) and
# attention sinks (gpt-oss). SpanAttention computes neither, so a model using them stays on the mask path.
_UNSUPPORTED_ARGUMENTS = ("softcap", "s_aux", "sinks")


def unsupported_reason(model) -> str | None:
    """Why packed attention would compute something else than `model`'s own attention, or None if it would not."""
    if not getattr(model, "_supports_attention_backend", False):
        return f"{type(model).__name__} does not route attention through transformers' AttentionInterface"
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text_config, "attn_logit_softcapping", None) is not None:
        return f"{type(model).__name__} soft-caps its attention scores (attn_logit_softcapping)"
    if any(isinstance(getattr(m, "sinks", None), torch.Tensor) for m in model.modules()):
        return f"{type(model).__name__} has attention sinks"
    return None


def sliding_window_of(model) -> tuple[int | None, bool]:
    """(window, every layer slides) of a sliding-window model or its config (Mistral, Phi3: every layer; Gemma2,
    Qwen2 with `use_sliding_window`: the layers `layer_types` marks), or (None, False) for full attention."""
    config = getattr(model, "config", model)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    if not window:
        return None, False
    types = getattr(config, "layer_types", None)
    if types is None:  # no per-layer types: the window applies to every layer
        return int(window), True
    sliding = [t == "sliding_attention" for t in types]
    return (int(window), all(sliding)) if any(sliding) else (None, False)


def supported(model) -> bool:
    """Whether packed attention computes `model`'s own attention: a model that routes attention through
    transformers' AttentionInterface (Llama, Qwen, Mistral, ...) with no score soft-capping or sinks."""
    return unsupported_reason(model) is None


def _padding_mask(*args, attention_mask: Tensor | None = None, **kwargs) -> Tensor | None:
    """None for a batch without a padding mask (flat rows: the spans replace the mask, and building a
    tokens x tokens mask there would cost a pass per forward); transformers' SDPA mask when the caller gave one,
    so a padded batch run without spans (the SDPA fallback of `packed_eager`) keeps its padding out."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register(compiled_layers: bool = False) -> str:
    """Register the attention functions with transformers (once); returns the name to switch the model to."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface, AttentionMaskInterface

        AttentionInterface.register(NAME, packed_eager)
        AttentionInterface.register(COMPILED_NAME, packed_eager_outside_graph)
        AttentionMaskInterface.register(NAME, _padding_mask)
        AttentionMaskInterface.register(COMPILED_NAME, _padding_mask)
        _registered = True
    return COMPILED_NAME if compiled_layers else NAME


@contextmanager
def switched(model) -> Iterator[None]:
    """`model` on packed attention within the block (unchanged if it already is), its own attention after."""
    before = attention_name(model)
    if is_active(model):
        yield
        return
    model.set_attn_implementation(register())
    try:
        yield
    finally:
        model.set_attn_implementation(before or "sdpa")
