"""BitFit (Ben Zaken et al. 2021): train only the bias terms; every weight matrix stays frozen.

Decoders without biases (Llama, SmolLM2) have almost nothing to train, so a targeted linear without a
bias gets a zero-initialised one (the model's function is unchanged at init) and a warning says how
many were added. Trainable parameters = the sum of `out_features` over the targeted linears.

Merged export of such a model turns on the architecture's own bias flags (Llama: `attention_bias`,
`mlp_bias`) and gives the other linears those flags cover zero biases, so `from_pretrained` reads the
result; biases no flag describes (an output head, say) make the export fail at once with one line.

Works on linears already wrapped by another method (LoRA's `DeltaLinear`, a bottleneck adapter): the
bias goes on the frozen base linear inside, so LoRA + BitFit combine. Apply BitFit after such
wrappers, or re-mark `trainable_parameters` afterwards, because a wrapper freezes its base on creation.
Disabling swaps the biases as they were at apply time back in (zeros for added ones).
"""

from __future__ import annotations

import logging
from typing import Iterator

import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.methods.base import Method, OriginalValues, register
from deltatune.methods.inject import innermost, layer_slots, match_targets
from deltatune.methods.nf4 import NF4Linear

log = logging.getLogger(__name__)


@register
class BitFit(Method):
    """Train the biases of the targeted linears, adding zero biases where a linear has none."""

    name = "bitfit"
    kind = "specification"
    shared_fields = frozenset({"targets"})
    mergeable = True  # merge/unmerge are no-ops: the trained biases already are the model's own parameters

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.slot_names: list[str] = []
        self.added: list[str] = []  # slots whose linear had no bias
        self._originals: OriginalValues | None = None

    def apply(self, model: nn.Module) -> None:
        slots = layer_slots(model)
        ids = {id(m) for m in slots.values()}
        self.slot_names = match_targets(model, self.spec.targets, accept=lambda m: id(m) in ids)
        self.added = []
        for name in self.slot_names:
            base = innermost(model.get_submodule(name))
            if base.bias is None:
                _add_zero_bias(base)
                self.added.append(name)
            base.bias.requires_grad_(True)
        self._originals = OriginalValues(self.bias_parameters(model))
        added = len(self.added)
        if added:
            log.warning(
                "bitfit: %d of %d targeted linear layers had no bias; added zero-initialised biases "
                "(the model's output is unchanged at init)",
                added,
                len(self.slot_names),
            )

    @property
    def added_biases(self) -> int:
        return len(self.added)

    def merge(self, model: nn.Module) -> None:
        """Nothing to fold: the biases are model parameters (see `prepare_export` for added ones)."""

    def unmerge(self, model: nn.Module) -> None:
        """Nothing to unfold (see `merge`)."""

    def set_disabled(self, model: nn.Module, disabled: bool) -> None:
        if self._originals is not None:
            self._originals.swap_in() if disabled else self._originals.swap_out()

    def prepare_export(self, model: nn.Module) -> None:
        """Turn on the config's bias flags that describe the added biases; zero-fill what they imply."""
        if not self.added:
            return
        added = {f"{name}.bias" for name in self.added}
        flags = bias_flags(model.config)
        chosen = {flag: keys for flag, keys in flags.items() if keys & added}
        covered = set().union(*chosen.values()) if chosen else set()
        left = sorted(added - covered)
        if left:
            raise ConfigError(
                f"bitfit added a bias the architecture's config cannot describe ('{left[0]}'; bias "
                f"flags: {', '.join(flags) or 'none'}); save the adapter instead of a merged model",
                field="method",
            )
        slots = layer_slots(model)
        unlike = sorted(k for k in covered - added if k.rsplit(".", 1)[0] not in slots)
        if unlike:  # an upcycled model: the config's flag describes dense MLPs, which its layers hold as experts
            raise ConfigError(
                f"bitfit's bias flag ({', '.join(chosen)}) would add '{unlike[0]}', which this model does not have "
                "(an upcycled model's MLPs are experts); save the adapter instead of a merged model",
                field="method",
            )
        for key in sorted(covered - added):
            module = innermost(slots[key.rsplit(".", 1)[0]])
            if module.bias is None:
                _add_zero_bias(module)  # the flag gives these linears a bias too: zero keeps the function
        for flag in chosen:
            setattr(model.config, flag, True)

    def bias_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [innermost(model.get_submodule(n)).bias for n in self.slot_names]

    def trainable_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        wanted = {id(p) for p in self.bias_parameters(model)}
        for name, p in model.named_parameters():
            if id(p) in wanted:
                yield name, p


def _add_zero_bias(linear: nn.Module) -> None:
    if isinstance(linear, NF4Linear):  # no .weight (see NF4Linear): its shape and dtype are recorded
        out_features, dtype, device = linear.out_features, linear.orig_dtype, linear.packed.device
    else:
        w = linear.weight
        out_features = w.shape[0] if isinstance(linear, nn.Linear) else w.shape[1]  # Conv1D stores (in, out)
        dtype, device = w.dtype, w.device
    linear.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)


def bias_flags(config) -> dict[str, set[str]]:
    """Each boolean config flag with "bias" in its name that is off -> the bias tensors it adds when on
    (found by building the architecture on the meta device, so no architecture is hard-coded)."""
    import copy

    from transformers import AutoModelForCausalLM

    def keys(cfg) -> set[str]:
        with torch.device("meta"):
            return set(AutoModelForCausalLM.from_config(cfg).state_dict())

    plain = keys(config)
    out: dict[str, set[str]] = {}
    for flag, value in config.to_dict().items():
        if "bias" in flag and value is False:
            on = copy.deepcopy(config)
            setattr(on, flag, True)
            extra = {k for k in keys(on) - plain if k.endswith(".bias")}
            if extra:
                out[flag] = extra
    return out
