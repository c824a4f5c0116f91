"""Dropout for the adapters' inputs that is cheap on CPU: 16 random bits per element instead of one
Bernoulli draw each.

`nn.Dropout` on CPU draws one Bernoulli sample per element from torch's Mersenne Twister, serially:
about 14 ms for one [3600, 576] bf16 activation on this project's CPU, and LoRA with dropout on all
seven linear layers of a 30-layer model runs 210 of them a step (a third of the step time of the
learn-forget experiment's LoRA runs). Here one 64-bit draw gives four 16-bit lanes and an element is
dropped when its lane falls below round(p * 65536): about 4.5 ms for the same activation, mask and
scaling included (a LoRA step: `benchmarks/lora_layer_speed.py`).

The distribution is dropout's with p rounded to a multiple of 1/65536 (|p - p_used| <= 7.7e-6; 0.05
becomes 0.0500031), and the scale is 1 / (1 - p_used), so the output stays unbiased: E[out] = x.
Kept values are x * scale as torch computes a tensor times a Python float (in float32 arithmetic for
bf16/fp16 inputs), by the kernel of torch's own dropout gradient. The bits come from torch's default
generator, so a seeded or resumed run draws the same masks. Off the CPU it is `F.dropout` (the CUDA
kernel is already fused).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LANES = 65536  # values of one 16-bit lane


def dropped_lanes(p: float) -> int:
    """How many of the 65536 values of a lane drop an element: round(p * 65536), at most 65535."""
    return min(round(p * LANES), LANES - 1)


def kept(lanes: Tensor, dropped: int) -> Tensor:
    """Uniform int16 lanes -> the elements kept: all but the `dropped` lowest lane values."""
    return lanes >= dropped - LANES // 2


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[Tensor, float]:
    """(boolean mask of the elements kept, the scale 1 / P(kept)) for dropout probability p."""
    dropped = dropped_lanes(p)
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), None)  # the full 64-bit range: all four lanes uniform (random_() leaves the top bit 0)
    lanes = words.view(torch.int16)[:n].view(shape)
    return kept(lanes, dropped), LANES / (LANES - dropped)


class _MaskedScale(torch.autograd.Function):
    """out = x * keep * scale, and the same for the gradient (keep saved as one byte an element)."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.ops.aten.native_dropout_backward(x, keep, scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        return torch.ops.aten.native_dropout_backward(grad, keep, ctx.scale), None, None


class Dropout(nn.Module):
    """`nn.Dropout(p)` for adapter inputs: same role and state dict (none), a cheaper mask on CPU."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        keep, scale = keep_mask(x.shape, self.p, x.device)
        return _MaskedScale.apply(x, keep, scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"
