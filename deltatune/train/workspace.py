"""Scratch buffers that persist across calls, grown to the largest request seen.

Two hot paths of a CPU training step need large or oddly sized temporaries every time: the
chunked LM-head loss (a chunk x vocabulary block of logits, 100+ MB) and span-by-span attention
(one set per example length). Fresh allocations cost there in two ways, both measured on this
machine: blocks above glibc's mmap threshold come back as new pages that the kernel zero-fills on
first touch (converting 27M bf16 logits to a new float32 tensor took 28.6 ms, an in-place softmax
over the same block 5.2 ms), and many differently sized blocks fragment the heap so that resident
memory grows step after step. Reusing buffers avoids both. `release_all()` frees them; the training
loop calls it when it ends.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_workspaces: list[Workspace] = []


class Workspace:
    """Named flat buffers per (dtype, device); `take` returns a view of the requested shape."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, Tensor] = {}
        _workspaces.append(self)

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A view [shape] of buffer `name`; its contents are whatever the last user left there."""
        numel = math.prod(shape)
        key = (name, dtype, device)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 0 if buf is None else 2 * buf.numel()), dtype=dtype, device=device)
            self.buffers[key] = buf
        return buf[:numel].view(shape)

    def release(self) -> None:
        self.buffers.clear()


def release_all() -> None:
    """Free every workspace's buffers (they are re-created on next use)."""
    for workspace in _workspaces:
        workspace.release()
