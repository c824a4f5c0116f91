"""Find modules by name pattern and swap them for wrapped versions; see through wrappers. Shared by every method."""

from __future__ import annotations

import re
from typing import Callable

from torch import nn

from deltatune.errors import ConfigError
from deltatune.methods.base import DeltaLinear, is_conv1d

# The output head is never an "all-linear" target: adapting it is a separate, explicit choice.
_NEVER_ALL_LINEAR = ("lm_head", "embed_out", "output")


def _is_linear(module: nn.Module) -> bool:
    """An `nn.Linear` or GPT-2's `Conv1D` (a linear storing its weight transposed; PEFT's fan_in_fan_out)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_linear_or_delta(module: nn.Module) -> bool:
    """A linear layer, or one another method already wrapped (so a second wrap is caught as a conflict)."""
    return _is_linear(module) or isinstance(module, DeltaLinear)


def named_by(name: str, suffix: str) -> bool:
    """Whether a module's qualified `name` is `suffix` or ends in it at a dot: how a target list names modules
    ("q_proj" names "model.layers.0.self_attn.q_proj"), as PEFT matches a list."""
    return name == suffix or name.endswith("." + suffix)


def match_targets(
    model: nn.Module,
    targets: str | list[str],
    accept: Callable[[nn.Module], bool] = _is_linear,
    *,
    inside_delta: bool = True,
) -> list[str]:
    """Names of modules that `targets` selects, among those `accept` allows.

    `targets` is "all-linear", a list or comma list of name suffixes ("q_proj,v_proj"), or a regex
    (full match against the qualified module name). "all-linear" may lead a list of further names or
    patterns ("all-linear,lm_head", as PEFT users add the head): their union. An empty match is an error
    that lists the names that do exist, so a typo never trains nothing. `inside_delta=False` skips modules
    inside an already injected `DeltaLinear` (its frozen `.base`), so the wrapper itself stands for the layer.
    """
    candidates = [n for n, m in model.named_modules() if n and accept(m)]
    if not inside_delta:
        wrapped = [n + "." for n, m in model.named_modules() if n and isinstance(m, DeltaLinear)]
        candidates = [n for n in candidates if not any(n.startswith(w) for w in wrapped)]
    extra = _beside_all_linear(targets)
    if extra:  # "all-linear,lm_head": each part is matched (and checked) on its own
        picked = set(match_targets(model, "all-linear", accept, inside_delta=inside_delta))
        picked |= set(match_targets(model, extra, accept, inside_delta=inside_delta))
        return [n for n in candidates if n in picked]
    if targets == "all-linear":
        chosen = [n for n in candidates if n.split(".")[-1] not in _NEVER_ALL_LINEAR]
    else:
        parts = targets if isinstance(targets, list) else [t.strip() for t in targets.split(",") if t.strip()]
        suffix_like = all(re.fullmatch(r"[\w.]+", p) for p in parts)
        if suffix_like:
            chosen = [n for n in candidates if any(named_by(n, p) for p in parts)]
            names = [n for n, _ in model.named_modules() if n]
            unknown = [p for p in parts if not any(named_by(n, p) for n in names)]
            if unknown and chosen:  # every name must match something: a typo in a list is not dropped
                kinds = sorted({n.split(".")[-1] for n in candidates})
                raise ConfigError(
                    f"'{unknown[0]}' in targets {targets!r} matches no module; module names that "
                    f"exist: {', '.join(kinds)}",
                    field="targets",
                )
            # a name that exists but selects nothing this method can adapt ("mlp", "embed_tokens" for LoRA)
            # is not dropped either: "q_proj,mlp" must not quietly train q_proj alone
            unusable = [p for p in parts if p not in unknown and not any(named_by(n, p) for n in chosen)]
            if unusable:
                kinds = sorted({n.split(".")[-1] for n in candidates})
                found = next(m for n, m in model.named_modules() if n and named_by(n, unusable[0]))
                raise ConfigError(
                    f"'{unusable[0]}' in targets {targets!r} names a module of type {type(found).__name__}, which this method "
                    f"cannot adapt; names it can: {', '.join(kinds)}",
                    field="targets",
                )
        else:
            try:
                rx = re.compile(targets if isinstance(targets, str) else "|".join(f"(?:{p})" for p in parts))
            except re.error as exc:
                raise ConfigError(f"targets {targets!r} is not a valid pattern ({exc})", field="targets") from None
            chosen = [n for n in candidates if rx.fullmatch(n)]
    if not chosen:
        kinds = sorted({n.split(".")[-1] for n in candidates})
        raise ConfigError(
            f"no module matches targets {targets!r}; module names that exist: {', '.join(kinds)}", field="targets"
        )
    return chosen


def _beside_all_linear(targets: str | list[str]) -> list[str]:
    """The other names of a target list that includes "all-linear" ([] when there is none, or nothing else):
    without this, the hyphen made "all-linear,lm_head" a regex that matched no module."""
    parts = targets if isinstance(targets, list) else [t.strip() for t in targets.split(",") if t.strip()]
    if "all-linear" not in parts:
        return []
    return [p for p in parts if p != "all-linear"]


def is_wrapper(module: nn.Module) -> bool:
    """A module that wraps a base layer in `.base` (a DeltaLinear, a bottleneck adapter)."""
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

    from deltatune.methods.nf4 import NF4Linear

    linear_types = (nn.Linear, Conv1D, NF4Linear)  # NF4Linear: a LoRA's quantised base, beside BitFit (QLoRA)
    slots: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(w + ".") for w in inside):
            continue
        if is_wrapper(module):
            inside.append(name)
            if isinstance(innermost(module), linear_types):
                slots[name] = module
        elif isinstance(module, linear_types):
            slots[name] = module
    return slots


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def wrap_linears(
    model: nn.Module, targets: str | list[str], make: Callable[[nn.Module], DeltaLinear], method_name: str
) -> list[str]:
    """Replace every linear that `targets` selects by `make(linear)`, tagged with `method_name`.

    A layer that another method already wrapped is a ConfigError naming both methods: two
    reparameterisations of one weight would make merge order-dependent and the PEFT file ambiguous.
    """
    names = match_targets(model, targets, accept=is_linear_or_delta, inside_delta=False)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, DeltaLinear):
            raise ConfigError(
                f"module '{name}' is already adapted by method '{getattr(module, 'method_name', '?')}'; "
                f"method '{method_name}' cannot wrap it too (choose disjoint targets)",
                field="targets",
            )
    for name in names:
        new = make(model.get_submodule(name))
        new.method_name = method_name
        replace_module(model, name, new)
    return names
