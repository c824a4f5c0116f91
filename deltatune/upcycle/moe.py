"""A mixture-of-experts block that replaces a decoder layer's MLP.

The experts are ordinary modules (copies of the dense MLP, with nn.Linear inside), so the method
injection (LoRA, DoRA, ...) can target their linears by name. The computation is vectorised over
tokens: tokens are grouped by expert with one stable sort, and each expert runs once on its
tokens (index_select in, index_add_ out); the only Python loop is over the E experts.

Routing (p = softmax of the router logits, computed in fp32):
- top-k: each token goes to its k most probable experts with combine weight p_e (raw, the
  paper's decoder default) or p_e / sum of its top-k p (renormalised). With a capacity factor C,
  each expert takes at most ceil(C*k*n/E) assignments while training; first choices of all tokens
  are served before second choices, in token order within a rank (GShard). Overflowing assignments
  are dropped (the token keeps its residual). At inference (eval mode) nothing is dropped, which is
  also what transformers' Mixtral / Qwen2-MoE compute, so exported models give the same logits.
- expert choice: each expert takes its top T = min(n, ceil(C*n/E)) tokens by p[:, e] with weight
  p[t, e]; a token may get several experts or none ("dropped"). It looks at the whole batch, so it is
  non-causal: fine for teacher-forced training and scoring, not a faithful autoregressive model.

Padding never routes: inside `routed_tokens(model, mask)` (the train loop's forwards) each block routes
only the tokens the mask marks as real, and the padding's MLP output is zero (it keeps its residual).
Prompt tuning's virtual tokens, prepended to every row after the mask was made, are real and route.
Otherwise padding would take capacity slots from real tokens (a short row's padding comes before the
next row's tokens), be chosen by expert-choice experts, and count in the balancing loss and the metrics.
The train loop keeps the mask through the backward pass, where activation checkpointing recomputes the blocks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

ROUTERS = ("topk", "expert-choice")
DEFAULT_AUX_WEIGHT = 0.01  # the train default of moe_aux_loss (deltatune/config.py), for exports of untrained blocks


def ceil_capacity(capacity: float, num: int, den: int) -> int:
    """ceil(capacity * num / den), exact for the decimal the user wrote: in floats, 1.1 * 200 / 4 is
    55.00000000000001 and its ceiling 56 (one slot too many)."""
    return math.ceil(Fraction(str(float(capacity))) * num / den)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """Routing runs in at least fp32 (fp64 stays fp64, so exactness tests can be tight)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


class MoEBlock(nn.Module):
    """Router (d_model -> E, no bias) + E expert MLPs; keeps the last forward's routing tensors in
    `last_routing` for the auxiliary losses and metrics (see losses.py)."""

    def __init__(
        self,
        experts: list[nn.Module],
        hidden_size: int,
        *,
        router: str = "topk",
        k: int = 2,
        capacity: float | None = None,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
        self.num_experts = len(experts)
        self.hidden_size = hidden_size
        self.router_type, self.k, self.capacity, self.normalize = router, k, capacity, normalize
        self.router = nn.Linear(hidden_size, self.num_experts, bias=False)
        self.experts = nn.ModuleList(experts)
        self.last_routing: dict[str, torch.Tensor] | None = None
        self.token_mask: torch.Tensor | None = None  # set by routed_tokens(): which tokens are real
        self.virtual_tokens = 0  # set by routed_tokens(): positions prompt tuning prepends after the mask was made
        self.aux_loss_weight = DEFAULT_AUX_WEIGHT  # the balancing weight it trains with (set by RouterLosses)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, router={self.router_type}, k={self.k}, capacity={self.capacity}, "
            f"normalize={self.normalize}"
        )

    # --- routing --------------------------------------------------------------------------------
    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(token index, expert index, combine weight) of every kept assignment, the assignments per
        expert before capacity drops (for the balancing loss), and the drop count (assignments for
        top-k, tokens that no expert took for expert choice)."""
        n, num_e = logits.shape
        probs = torch.softmax(upcast(logits), dim=-1)
        if self.router_type == "expert-choice":
            t = min(n, ceil_capacity(self.capacity or 1.0, n, num_e))
            weight, token = probs.topk(t, dim=0)  # [T, E]: each expert's top-T tokens
            expert = torch.arange(num_e, device=logits.device).expand(t, num_e)
            covered = torch.zeros(n, dtype=torch.bool, device=logits.device)
            covered[token.reshape(-1)] = True
            assigned = torch.full((num_e,), t, device=logits.device)
            return (
                token.t().reshape(-1),
                expert.t().reshape(-1),
                weight.t().reshape(-1),
                assigned,
                int(n - covered.sum()),
            )
        top_p, top_e = probs.topk(self.k, dim=-1)  # [n, k]
        if self.normalize:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        # rank-major order: every token's first choice, then every token's second choice, ...
        expert = top_e.t().reshape(-1)
        token = torch.arange(n, device=logits.device).repeat(self.k)
        weight = top_p.t().reshape(-1)
        assigned = torch.bincount(expert, minlength=num_e)
        dropped = 0
        if self.capacity is not None and self.training:
            cap = ceil_capacity(self.capacity, self.k * n, num_e)
            onehot = F.one_hot(expert, num_e)
            slot = (onehot.cumsum(0) * onehot).sum(-1) - 1  # this assignment's place in its expert's queue
            keep = slot < cap
            dropped = int((~keep).sum())
            token, expert, weight = token[keep], expert[keep], weight[keep]
        return token, expert, weight, assigned, dropped

    # --- forward --------------------------------------------------------------------------------
    def mask_for(self, shape: torch.Size) -> torch.Tensor | None:
        """The token mask for hidden states of `shape` ([B, T', H]). Prompt tuning prepends its p virtual
        tokens to every row after the batch's [B, T] mask was set, so T' = p + T: those leading positions
        are real inputs (trained embeddings the attention sees), so they route like any real token. Only
        exactly p more positions are read so: a mask of another batch is refused, not padded to fit."""
        mask = self.token_mask
        if mask is None:
            return None
        p = self.virtual_tokens
        if p and mask.dim() == 2 and len(shape) == 3 and mask.shape[0] == shape[0] and mask.shape[1] + p == shape[1]:
            # a row with no real token (a torchrun rank's zero-weight stand-in) routes none of them either
            mask = torch.cat([mask.any(dim=1, keepdim=True).expand(-1, p), mask], dim=1)
        if mask.numel() != shape.numel() // shape[-1]:
            raise RuntimeError(
                f"the token mask has {mask.numel()} entries for {shape.numel() // shape[-1]} tokens "
                "(set by routed_tokens for another batch)"
            )
        return mask

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        real = None
        mask = self.mask_for(shape)
        if mask is not None:
            real = mask.reshape(-1).nonzero().squeeze(1)
            x = x.index_select(0, real)
        logits = self.router(x)
        token, expert, weight, assigned, dropped = self.route(logits)
        order = torch.argsort(expert, stable=True)
        token, weight = token[order], weight[order]
        counts = torch.bincount(expert, minlength=self.num_experts)
        out = torch.zeros_like(x)
        start = 0
        for e, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            idx = token[start : start + count]
            y = self.experts[e](x.index_select(0, idx))
            out.index_add_(0, idx, (y * weight[start : start + count, None]).to(out.dtype))
            start += count
        self.last_routing = {
            "logits": logits,
            "assigned": assigned,
            "processed": counts,
            "dropped": torch.tensor(dropped),
        }
        if real is not None:  # padding rows of the output stay zero
            out = torch.zeros(shape.numel() // shape[-1], shape[-1], dtype=out.dtype, device=out.device).index_copy(
                0, real, out
            )
        return out.reshape(shape)


def moe_blocks(model: nn.Module) -> list[tuple[str, MoEBlock]]:
    """(name, block) of every MoE block in the model, in layer order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoEBlock)]


def routes_across_rows(model: nn.Module) -> bool:
    """Whether a row's output depends on the other rows of its batch: expert-choice experts pick their tokens
    among all the batch's (top-k routes each token on its own). Evaluation runs such a model a row at a time."""
    return any(b.router_type == "expert-choice" for _, b in moe_blocks(model))


@contextmanager
def routed_tokens(blocks: list[MoEBlock], mask: torch.Tensor | None, virtual_tokens: int = 0) -> Iterator[None]:
    """Within the block, the MoE blocks route only the tokens where `mask` ([B, T] bool, True = a real
    token of the batch) is set; None routes every token (a batch without padding). `virtual_tokens`: the
    positions prompt tuning prepends to each row after the mask was made (`prepended_tokens(model)`)."""
    for b in blocks:
        b.token_mask, b.virtual_tokens = mask, virtual_tokens
    try:
        yield
    finally:
        for b in blocks:
            b.token_mask, b.virtual_tokens = None, 0
