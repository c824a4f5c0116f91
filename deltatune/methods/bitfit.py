"""BitFit (Ben Zaken et al. 2021): train only the bias terms; every weight matrix stays frozen.

Decoders without biases (Llama, SmolLM2) have almost nothing to train, so a targeted linear without a
bias gets a zero-initialised one (the model's function is unchanged at init) and a warning says how
many were added. Trainable parameters = the sum of `out_features` over the targeted linears.

Works on linears already wrapped by another method (LoRA's `DeltaLinear`, a bottleneck adapter): the
bias goes on the frozen base linear inside, so LoRA + BitFit combine. Apply BitFit after such
wrappers, or re-mark `trainable_parameters` afterwards, because a wrapper freezes its base on creation.
"""

from __future__ import annotations

import logging
from typing import Iterator

import torch
from torch import nn

from deltatune.methods.base import DeltaLinear, Method, register
from deltatune.methods.inject import match_targets

log = logging.getLogger(__name__)


def is_wrapper(module: nn.Module) -> bool:
    """A module that wraps a base layer in `.base` (LoRA-style DeltaLinear, bottleneck adapter)."""
    return isinstance(module, DeltaLinear) or getattr(module, "wraps_base_layer", False)


def innermost(module: nn.Module) -> nn.Module:
    while is_wrapper(module):
        module = module.base
    return module


def layer_slots(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> module for each linear "slot": a plain linear, or the outermost wrapper of one.

    Linears living inside a wrapper (its base, or an adapter's own projections) are not slots, so
    "all-linear" never picks LoRA's A/B matrices.
    """
    from transformers.pytorch_utils import Conv1D

    slots: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(w + ".") for w in inside):
            continue
        if is_wrapper(module):
            inside.append(name)
            if isinstance(innermost(module), (nn.Linear, Conv1D)):
                slots[name] = module
        elif isinstance(module, (nn.Linear, Conv1D)):
            slots[name] = module
    return slots


@register
class BitFit(Method):
    """Train the biases of the targeted linears, adding zero biases where a linear has none."""

    name = "bitfit"
    kind = "specification"
    mergeable = True  # merge/unmerge are no-ops: the trained biases already are the model's own parameters

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.slot_names: list[str] = []
        self.added_biases = 0

    def apply(self, model: nn.Module) -> None:
        slots = layer_slots(model)
        ids = {id(m) for m in slots.values()}
        self.slot_names = match_targets(model, self.spec.targets, accept=lambda m: id(m) in ids)
        added = 0
        for name in self.slot_names:
            base = innermost(model.get_submodule(name))
            if base.bias is None:
                w = base.weight
                out_features = w.shape[0] if isinstance(base, nn.Linear) else w.shape[1]  # Conv1D stores (in, out)
                base.bias = nn.Parameter(torch.zeros(out_features, dtype=w.dtype, device=w.device))
                added += 1
            base.bias.requires_grad_(True)
        self.added_biases = added
        if added:
            log.warning("bitfit: %d of %d targeted linear layers had no bias; added zero-initialised biases "
                        "(the model's output is unchanged at init)", added, len(self.slot_names))

    def merge(self, model: nn.Module) -> None:
        """Nothing to fold: the biases are model parameters. (Exporting a Llama with added biases needs
        `attention_bias`/`mlp_bias` in its config; export code reads `added_biases`.)"""

    def unmerge(self, model: nn.Module) -> None:
        """Nothing to unfold (see `merge`)."""

    def bias_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [innermost(model.get_submodule(n)).bias for n in self.slot_names]

    def trainable_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        wanted = {id(p) for p in self.bias_parameters(model)}
        for name, p in model.named_parameters():
            if id(p) in wanted:
                yield name, p
