"""Weighted token loss through the LM head, chunked so the full logits tensor never exists.

Only positions whose target carries weight go through the head: with a response-only policy
that skips the instruction tokens' (batch x vocabulary) logits entirely. Within those, the head
and cross-entropy run chunk by chunk; the gradient with respect to the hidden states (and the
head weight, when it trains) is computed in the forward pass, chunk by chunk, so backward only
scales it. Memory: one chunk of logits (chunk x vocab floats) at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deltatune.train.workspace import Workspace

_workspace = Workspace()


@dataclass(frozen=True)
class LogitTransform:
    """What a model's causal-LM forward does to `lm_head`'s output before the loss: logits * scale (Cohere's
    `logit_scale`, 1 / Granite's `logits_scaling`), then softcap * tanh(logits / softcap) (Gemma2/3's
    `final_logit_softcapping`). The loss here starts from the head, so it must apply them too."""

    scale: float = 1.0
    softcap: float | None = None


def logit_transform(model: torch.nn.Module) -> LogitTransform:
    """The LogitTransform of a transformers causal-LM (identity for Llama, Qwen, Mistral, ...)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = float(getattr(model, "logit_scale", None) or getattr(text, "logit_scale", None) or 1.0)
    if getattr(text, "logits_scaling", None):
        scale /= float(text.logits_scaling)
    softcap = getattr(text, "final_logit_softcapping", None)
    return LogitTransform(scale, float(softcap) if softcap else None)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Σ w·nll with its gradient computed in the forward pass, chunk by chunk.

    Per chunk, in reused buffers (train/workspace.py): logits in the compute dtype, copied once to
    float32, softmax in place. The log-sum-exp comes from the row maximum m and the largest
    probability p_max = exp(m - lse) >= 1/V, so lse = m - log(p_max) never underflows; nll = lse -
    logit[target]. The gradient (softmax - onehot) is rounded once to the compute dtype and the
    token weights scale the (chunk x hidden) product instead of the (chunk x vocabulary) block.
    A model's LogitTransform (scale, soft cap) is applied to the float32 logits, and its derivative
    (scale * (1 - tanh^2)) to their gradient.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        token_weights: Tensor,
        chunk: int,
        compute_dtype: torch.dtype,
        need_grad_hidden: bool,
        need_grad_weight: bool,
        logit_scale: float = 1.0,
        softcap: float | None = None,
    ) -> Tensor:
        n, device = hidden.shape[0], hidden.device
        acc = torch.promote_types(compute_dtype, torch.float32)  # softmax and sums in >= fp32
        w_c = weight.to(compute_dtype)
        total = torch.zeros((), dtype=acc, device=device)
        grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None
        grad_weight = None  # the first chunk's product, then the others added in place (no vocabulary-sized fill)
        grad_bias = torch.zeros_like(bias, dtype=acc) if (bias is not None and bias.requires_grad) else None
        for start in range(0, n, chunk):
            h = hidden[start : start + chunk].to(compute_dtype)
            t = targets[start : start + chunk]
            tw = token_weights[start : start + chunk].to(acc)
            rows = torch.arange(t.shape[0], device=device)
            shape = (t.shape[0], weight.shape[0])
            logits = torch.mm(h, w_c.T, out=_workspace.take("logits", shape, compute_dtype, device))
            probs = logits if acc == compute_dtype else _workspace.take("probs", shape, acc, device).copy_(logits)
            if bias is not None:
                probs += bias.to(acc)
            if logit_scale != 1.0:
                probs *= logit_scale
            slope = None  # d softcap*tanh(z/softcap) / dz = 1 - tanh(z/softcap)^2
            if softcap is not None:
                probs.div_(softcap).tanh_()
                if need_grad_hidden or need_grad_weight or grad_bias is not None:
                    slope = torch.mul(probs, probs, out=_workspace.take("slope", shape, acc, device)).neg_().add_(1.0)
                probs.mul_(softcap)
            target_logit = probs[rows, t]
            row_max = probs.amax(dim=-1)
            torch._softmax(probs, -1, False, out=probs)
            lse = row_max - probs.amax(dim=-1).log()
            total += ((lse - target_logit) * tw).sum()
            if not (need_grad_hidden or need_grad_weight or grad_bias is not None):
                continue
            # d(sum w*nll)/dlogits = w * (softmax - onehot)
            probs[rows, t] -= 1.0
            if slope is not None:
                probs *= slope
            if logit_scale != 1.0:
                probs *= logit_scale
            g = probs if acc == compute_dtype else logits.copy_(probs)  # the logits are spent: reuse
            if need_grad_hidden:
                grad_hidden[start : start + chunk] = (torch.mm(g, w_c) * tw[:, None]).to(hidden.dtype)
            if need_grad_weight:
                part = g.T @ (h * tw[:, None].to(h.dtype))
                grad_weight = part.to(acc) if grad_weight is None else grad_weight.add_(part)
            if grad_bias is not None:
                grad_bias += torch.mv(probs.T, tw)
        if need_grad_weight and grad_weight is None:  # no loss-bearing rows at all
            grad_weight = torch.zeros_like(weight, dtype=acc)
        ctx.save_for_backward(*(x for x in (grad_hidden, grad_weight, grad_bias) if x is not None))
        ctx.has = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        saved = list(ctx.saved_tensors)
        has_h, has_w, has_b = ctx.has
        gh = saved.pop(0) * grad_out.to(ctx.dtypes[0]) if has_h else None
        gw = (saved.pop(0) * grad_out).to(ctx.dtypes[1]) if has_w else None
        gb = (saved.pop(0) * grad_out).to(ctx.dtypes[2]) if has_b else None
        return gh, gw, gb, None, None, None, None, None, None, None, None


# The loss-bearing rows are padded (with zero weight) to a multiple of this: the CPU matmul library
# builds and caches a kernel per shape, and a count that changes every step kept building new ones
# (see deltatune/data/packing.py FLAT_MULTIPLE).
ROW_MULTIPLE = 32


def weighted_lm_loss_sum(
    hidden: Tensor,
    head: torch.nn.Module,
    input_ids: Tensor,
    loss_weights: Tensor,
    *,
    chunk: int = 1024,
    compute_dtype: torch.dtype | None = None,
    transform: LogitTransform | None = None,
) -> tuple[Tensor, Tensor]:
    """Σ_t w_t · nll(token_t | tokens_<t) over the batch, and Σ_t w_t.

    `hidden` is the final hidden state [B, T, H]; position t-1 predicts token t, whose weight is
    `loss_weights[:, t]`. The caller divides by the total weight of the whole accumulated batch.
    `transform`: what the model does to the head's output (`logit_transform(model)`); without it the
    loss is that of the head's raw logits, which is not the model's for Gemma2/3, Cohere or Granite.
    """
    batch, length, width = hidden.shape
    w = loss_weights[:, 1:].to(torch.promote_types(hidden.dtype, torch.float32))
    b, t = (w > 0).nonzero(as_tuple=True)  # positions t predict tokens t + 1
    rows = b * length + t
    pad = -rows.numel() % ROW_MULTIPLE  # zero-weight rows: a few dozen matmul shapes, not one per step
    rows = torch.cat([rows, rows.new_zeros(pad)])
    h = hidden.reshape(batch * length, width).index_select(0, rows)
    targets = torch.cat([input_ids[b, t + 1], input_ids.new_zeros(pad)])
    w = torch.cat([w[b, t], w.new_zeros(pad)])
    transform = transform or LogitTransform()
    if type(head) is not torch.nn.Linear:  # an adapted head (LoRA on lm_head): its weight is not what it computes
        return _module_head_loss_sum(head, h, targets, w, chunk, transform), w.sum()
    weight = head.weight
    bias = getattr(head, "bias", None)
    if compute_dtype is None:
        compute_dtype = weight.dtype if weight.dtype != torch.float32 else hidden.dtype
    total = _ChunkedLinearCrossEntropy.apply(
        h,
        weight,
        bias,
        targets,
        w,
        chunk,
        compute_dtype,
        h.requires_grad,
        weight.requires_grad,
        transform.scale,
        transform.softcap,
    )
    return total, w.sum()


def _module_head_loss_sum(
    head: torch.nn.Module, h: Tensor, targets: Tensor, w: Tensor, chunk: int, transform: LogitTransform
) -> Tensor:
    """Σ w·nll through the head module's own forward, a chunk at a time, each chunk's logits recomputed in
    backward instead of kept: for heads that are not a plain linear (an adapter on lm_head), whose gradients
    reach the adapter only through that forward."""
    from torch.utils.checkpoint import checkpoint

    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        part = slice(start, start + chunk)
        total = total + checkpoint(_head_nll_sum, head, h[part], targets[part], w[part], transform, use_reentrant=False)
    return total


def _head_nll_sum(head: torch.nn.Module, h: Tensor, targets: Tensor, w: Tensor, transform: LogitTransform) -> Tensor:
    logits = head(h).float() * transform.scale
    if transform.softcap is not None:
        logits = transform.softcap * torch.tanh(logits / transform.softcap)
    return (torch.nn.functional.cross_entropy(logits, targets, reduction="none") * w.float()).sum()


def per_example_weights(loss_weights: Tensor, position_ids: Tensor) -> Tensor:
    """Token weights rescaled so that each example's weights sum to 1 (`loss_reduction: example`).

    Σ w'·nll / Σ w' over a batch is then the mean over examples of each example's own weighted mean
    loss. An example starts where its position id is 0 (packed rows restart positions per example;
    padding carries no weight); an example whose weights are all 0 stays 0 and does not count.
    """
    example = (position_ids == 0).flatten().cumsum(0) - 1  # example index of every token, across rows
    w = loss_weights.flatten().to(torch.float64)
    totals = torch.zeros(int(example.max()) + 1, dtype=torch.float64, device=w.device).index_add_(0, example, w)
    scale = torch.where(totals > 0, 1.0 / totals.clamp_min(1e-300), torch.zeros_like(totals))
    return (w * scale[example]).view_as(loss_weights).to(loss_weights.dtype)


def reference_lm_loss_sum(logits: Tensor, input_ids: Tensor, loss_weights: Tensor) -> tuple[Tensor, Tensor]:
    """The plain (unchunked) computation from full logits; used in tests and evaluation of small batches."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    lp = torch.log_softmax(logits[:, :-1].to(acc), dim=-1)
    nll = -lp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    w = loss_weights[:, 1:].to(acc)
    return (nll * w).sum(), w.sum()
