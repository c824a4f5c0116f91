"""The protocol every delta-tuning method implements.

Three kinds (the Delta Tuning survey's taxonomy):
- reparameterisation (LoRA, rsLoRA, DoRA, MoRA, (IA)3 on linears): a `DeltaLinear` wrapping a frozen
  linear, with `delta_weight()`, so merge, unmerge, analysis and export work the same for each;
- addition (bottleneck adapters, prefix and prompt tuning): new modules or vectors; `mergeable`
  says whether they fold into weights, `why_not_mergeable` says why not;
- specification (full finetuning, BitFit, chosen layers): a rule for which existing parameters train.

A method's own file holds its math; injection by name pattern, freezing, counting and saving live
here and in inject.py so that adding the next method is copying a sibling.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from deltatune.errors import ConfigError


@dataclass
class MethodSpec:
    """What the user asked for: a method name, its targets and its hyperparameters."""

    name: str
    targets: str | list[str] = "all-linear"  # regex, suffix list "q_proj,v_proj", or "all-linear"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # method-specific extras

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values, as saved in deltatune_adapter.json."""
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, file: str | None = None) -> "MethodSpec":
        from dataclasses import fields

        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(f"unknown method key '{unknown[0]}'; allowed: {', '.join(sorted(allowed))}",
                              file=file, field=unknown[0])
        if "name" not in data:
            raise ConfigError("a method needs a 'name'", file=file, field="name")
        return cls(**data)


class DeltaLinear(nn.Module):
    """A frozen base `nn.Linear` plus a trainable change. Subclasses implement the math.

    Subclasses implement `delta_weight()` (fp32, shape (out, in)) and `adapted_forward(x, base_out)`.
    Merge and unmerge are shared: W <- W + dW and back, computed in fp32. Methods whose merge is not
    additive (DoRA) override `merge`/`unmerge`.
    """

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.merged = False
        self.disabled = False
        for p in self.base.parameters():
            p.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # so code that reads `.weight` of a linear keeps working
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def adapted_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged or self.disabled:
            return out
        return self.adapted_forward(x, out)

    def _already(self, merged: bool) -> bool:
        """True (with a warning) when the adapter is already in the `merged` state asked for."""
        if self.merged == merged:
            state = "already merged; merge()" if merged else "is not merged; unmerge()"
            warnings.warn(f"adapter {state} does nothing", stacklevel=3)
            return True
        return False

    @torch.no_grad()
    def merge(self) -> None:
        if self._already(merged=True):
            return
        w = self.base.weight
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._already(merged=False):
            return
        w = self.base.weight
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False


class Method:
    """One delta-tuning method applied to one model. Subclasses set the class attributes."""

    name: ClassVar[str]
    kind: ClassVar[str]  # "reparameterisation" | "addition" | "specification"
    mergeable: ClassVar[bool] = False
    why_not_mergeable: ClassVar[str] = ""
    peft_type: ClassVar[str | None] = None  # PEFT's name where PEFT has the method

    def __init__(self, spec: MethodSpec) -> None:
        self.spec = spec

    # --- the protocol -------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> None:
        """Inject modules / mark parameters trainable. Must not touch the base weights' values."""
        raise NotImplementedError

    def trainable_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters this method trains (names as in `model.named_parameters()`).

        Default (reparameterisation methods): the parameters of this method's `DeltaLinear`s
        other than the frozen base layer's. Other kinds override it."""
        for name, module in self.named_delta_modules(model):
            for pname, p in module.named_parameters():
                if not pname.startswith("base."):
                    yield f"{name}.{pname}", p

    def merge(self, model: nn.Module) -> None:
        if not self.mergeable:
            raise ConfigError(f"method '{self.name}' cannot be merged: {self.why_not_mergeable}")
        for module in self.delta_modules(model):
            module.merge()

    def unmerge(self, model: nn.Module) -> None:
        if not self.mergeable:
            raise ConfigError(f"method '{self.name}' cannot be merged: {self.why_not_mergeable}")
        for module in self.delta_modules(model):
            module.unmerge()

    # --- shared helpers -----------------------------------------------------------------------
    def delta_modules(self, model: nn.Module) -> list[DeltaLinear]:
        """The `DeltaLinear`s this method injected (reparameterisation methods)."""
        return [m for m in model.modules() if isinstance(m, DeltaLinear) and getattr(m, "method_name", None) == self.name]

    def named_delta_modules(self, model: nn.Module) -> list[tuple[str, DeltaLinear]]:
        """Like `delta_modules`, with qualified module names."""
        return [(n, m) for n, m in model.named_modules()
                if isinstance(m, DeltaLinear) and getattr(m, "method_name", None) == self.name]

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Adapter-only weights: exactly the trainable parameters (and buffers a method adds)."""
        return {n: p.detach() for n, p in self.trainable_parameters(model)}

    def unload(self, model: nn.Module) -> None:
        """After `merge`: swap each injected `DeltaLinear` back for its (merged) base linear, so the
        model is a plain transformers model again (used by merged export). Methods that add other
        modules override this."""
        for name, module in self.named_delta_modules(model):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.base)

    # --- PEFT interoperability hooks (deltatune/methods/peft_format.py calls these) -------------
    # A method that PEFT also implements sets `peft_type` (PEFT's name, e.g. "LORA", "IA3") and
    # overrides `peft_config` and `from_peft_config`; the key hooks only need overriding when its
    # parameter names differ from PEFT's saved names beyond the "base_model.model." prefix (PEFT
    # saves keys without the adapter name, e.g. `...q_proj.lora_A.weight`). An adapter is written in
    # PEFT's format only when it holds exactly one method with a `peft_type`; every other combination
    # uses deltatune's own file (`deltatune_adapter.json`), which needs none of these hooks.

    PEFT_PREFIX: ClassVar[str] = "base_model.model."

    def peft_config(self, model: nn.Module) -> dict[str, Any] | None:
        """The method-specific fields of PEFT's adapter_config.json (e.g. r, lora_alpha,
        target_modules), or None when PEFT cannot represent this configuration. The writer adds the
        common fields (peft_type, task_type, base_model_name_or_path, peft_version, ...)."""
        return None

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> MethodSpec | None:
        """The MethodSpec that reproduces a PEFT adapter_config.json of this method's `peft_type`,
        or None when this class does not handle it (e.g. LoRA declines `use_dora: true` so DoRA can
        claim it). Raise ConfigError for PEFT options the method cannot reproduce."""
        return None

    def to_peft_key(self, name: str) -> str:
        """A parameter name of ours (as in model.named_parameters()) -> PEFT's saved key."""
        return self.PEFT_PREFIX + name

    def from_peft_key(self, key: str) -> str:
        """PEFT's saved key -> our parameter name; the inverse of `to_peft_key`."""
        if not key.startswith(self.PEFT_PREFIX):
            raise ConfigError(f"unexpected PEFT key '{key}' (expected the prefix '{self.PEFT_PREFIX}')")
        return key[len(self.PEFT_PREFIX):]


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its `name` in configs and the CLI."""
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin_methods() -> None:
    import importlib
    import pkgutil

    import deltatune.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in {"base", "inject"}:
            importlib.import_module(f"deltatune.methods.{info.name}")


def get_method(name: str) -> type[Method]:
    _load_builtin_methods()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method '{name}'; choose one of: {', '.join(sorted(_REGISTRY))}", field="method")
    return _REGISTRY[name]


def method_names() -> list[str]:
    _load_builtin_methods()
    return sorted(_REGISTRY)
