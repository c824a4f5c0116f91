"""Full finetuning, of the whole model or of chosen modules (a specification method).

`targets`: "all" (or the MethodSpec default "all-linear", read here as "everything", since full
finetuning of only the linears is rarely what anyone means; use a regex to get exactly that), or
a regex / suffix list over module names, e.g. `model.layers.1` or `model\\.layers\\.(0|1)\\..*` or
`embed_tokens,lm_head`; every parameter inside a matched module trains.

Merge is a no-op: the weights are trained in place, so the model is always "merged". `mergeable`
is True so that merged export simply writes the model. Saving writes the trained tensors (the
whole model for "all") to safetensors in deltatune's adapter format.
"""

from __future__ import annotations

from typing import Iterator

from torch import nn

from deltatune.methods.base import Method, register
from deltatune.methods.inject import match_targets

ALL = ("all", "all-linear", "*", "")


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


@register
class FullFinetune(Method):
    name = "full"
    kind = "specification"
    shared_fields = frozenset({"targets"})
    mergeable = True
    trains_full_weights = True
    can_disable = False
    why_not_disable = "full finetuning changes the weights themselves (no copy of the base is kept)"

    def apply(self, model: nn.Module) -> None:
        targets = self.spec.targets
        if targets in ALL or targets == ["all"]:
            params = list(model.parameters())
        else:
            params = []
            for name in match_targets(model, targets, accept=_has_parameters):
                params.extend(model.get_submodule(name).parameters())
        wanted = {id(p) for p in params}
        # (module, attribute) of each trained weight, not the weight objects' ids: a deepcopy or pickle of the
        # model copies these modules along (ids would name the original's weights, so the copy trained and saved
        # nothing), and load_state_dict(assign=True) puts new weights in the same places
        self._owners = [
            (module, attr)
            for module in model.modules()
            for attr, p in module.named_parameters(recurse=False)
            if id(p) in wanted
        ]
        for p in params:
            p.requires_grad_(True)

    def trainable_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        ids = {id(getattr(module, attr)) for module, attr in getattr(self, "_owners", [])}
        for name, p in model.named_parameters():
            if id(p) in ids:
                yield name, p

    def merge(self, model: nn.Module) -> None:
        """No-op: full finetuning changes the weights themselves."""

    def unmerge(self, model: nn.Module) -> None:
        """No-op, see `merge`."""
