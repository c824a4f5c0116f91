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

import contextlib
import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.methods.nf4 import NF4_OPTIONS, QuantOptions, quant_options, quantize_bases, requantize_bases
from deltatune.methods.options import Option, read_options

# Set to True on a parameter stored as a matrix that is a vector (IA3's scaling vectors, (d, 1) or (1, d) as PEFT
# stores them): the optimizer gives it no weight decay, as other vectors (decay pulled IA3's 1.0 start towards 0).
VECTOR_ATTR = "deltatune_vector"


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
            raise ConfigError(
                f"unknown method key '{unknown[0]}'; allowed: {', '.join(sorted(allowed))}", file=file, field=unknown[0]
            )
        if "name" not in data:
            raise ConfigError("a method needs a 'name'", file=file, field="name")
        return cls(**data)


def outside_autocast(fn: Callable) -> Callable:
    """Run a merge or unmerge in fp32 even when called inside an autocast region (a weight analysis during a
    bf16 training step): autocast would round delta W's products to bf16, and in-place index ops would then mix
    dtypes."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device):
                    stack.enter_context(torch.autocast(device, enabled=False))
            return fn(*args, **kwargs)

    return wrapper


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's `Conv1D`: a linear that stores its weight as (in, out)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an `nn.Linear`, a `Conv1D`, a quantised linear or a `DeltaLinear`."""
    if is_conv1d(module):
        return module.nx, module.nf
    return module.in_features, module.out_features


class DeltaLinear(nn.Module):
    """A frozen base linear plus a trainable change. Subclasses implement the math.

    Subclasses implement `delta_weight()` (fp32, shape (out, in)) and `adapted_forward(x, base_out)`.
    Merge and unmerge are shared: W <- W + dW and back, computed in fp32. Methods whose merge is not
    additive (DoRA, (IA)3) override `merge`/`unmerge`. Unmerge gives back W bit for bit: W + dW - dW
    rounds in W's dtype, so merge keeps the few entries where it would not come back exactly
    (`_keep_original`) and unmerge puts them back (`_put_back_original`). The base is an `nn.Linear` or a quantised
    layer with `dequantize()` and `to_linear()` (the NF4 base, nf4.py): read W0 with `base_weight()`;
    merging first swaps a quantised base for its dequantised linear.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        # GPT-2's Conv1D stores W transposed, (in, out) ("fan_in_fan_out"): W0 and dW are (out, in) here,
        # and only reads and writes of the stored tensor transpose (`base_weight`, `_stored`)
        self.fan_in_fan_out = is_conv1d(base)
        self.merged = False
        self.disabled = False
        self._originals: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # while merged: see _keep_original
        for p in self.base.parameters():
            p.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return linear_features(self.base)[0]

    @property
    def out_features(self) -> int:
        return linear_features(self.base)[1]

    def _stored(self, w: torch.Tensor) -> torch.Tensor:
        """An (out, in) matrix in the base's storage layout, or back (a transposed view for Conv1D)."""
        return w.T if self.fan_in_fan_out else w

    @property
    def weight(self) -> torch.Tensor:  # so code that reads `.weight` of a linear keeps working
        return self.base.weight  # a quantised base has none on purpose: use base_weight()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def base_is_quantized(self) -> bool:
        return hasattr(self.base, "dequantize")

    def base_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W0 (the frozen base weight, dequantised when quantised) in `dtype`."""
        if self.base_is_quantized:
            return self.base.dequantize(dtype)
        return self._stored(self.base.weight).to(dtype)

    def base_changed(self) -> None:
        """Called after the base was swapped (e.g. quantised); methods whose state derives from W0
        (DoRA's magnitude) re-derive it here."""

    def activation_numel_per_token(self) -> int:
        """Numbers this layer keeps for backward per token beyond the base's (memory planning)."""
        return 0

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

    def _keep_original(self, name: str, original: torch.Tensor, unmerged: torch.Tensor) -> None:
        """Before a merge overwrites `original` (the base's `name`): keep its values where `unmerged`, what
        unmerge will compute from the merged tensor, differs from it. Rounding makes such entries rare: 0.2-6%
        of a bf16 weight for changes of 0.07-7% of its size (int32 positions: a fifth of the weight's bytes at most)."""
        wrong = (unmerged != original).flatten().nonzero().squeeze(1)
        if original.numel() < 2**31:
            wrong = wrong.to(torch.int32)
        self._originals[name] = (wrong, original.flatten()[wrong].clone())

    def _put_back_original(self, name: str, tensor: torch.Tensor) -> None:
        """After an unmerge: the entries `_keep_original` kept, so `tensor` is the original bit for bit."""
        kept = self._originals.pop(name, None)
        if kept is not None:
            where, values = kept
            flat = tensor.view(-1)
            flat[where.to(flat.device)] = values.to(device=flat.device, dtype=flat.dtype)

    def dequantize_base(self) -> None:
        """Swap a quantised base for a plain linear holding its dequantised weight (before a merge). The
        quantised module is kept aside (4-bit codes: an eighth of the weight's fp32 bytes) for unmerge."""
        if self.base_is_quantized:
            if self.__dict__.get("_kept_quantized_base") is None:  # the original, not a merge_requantize copy
                object.__setattr__(self, "_kept_quantized_base", self.base)  # not a submodule: not in state_dict
            self.base = self.base.to_linear()

    def restore_quantized_base(self) -> None:
        """After an unmerge: the quantised base the merge dequantised, as it was. The dequantised linear held
        the same numbers but computed in full precision (QLoRA's NF4 product computes in its compute dtype),
        so the unmerged model's logits differed from the model before the merge (by 2.2e-3 in fp32)."""
        kept = self.__dict__.get("_kept_quantized_base")
        if kept is not None:
            self.base = kept.to(self.base.weight.device)
            object.__setattr__(self, "_kept_quantized_base", None)

    @torch.no_grad()
    @outside_autocast
    def merge(self) -> None:
        if self._already(merged=True):
            return
        self.dequantize_base()
        w = self.base.weight
        acc = torch.promote_types(w.dtype, torch.float32)  # a float64 model merges in float64, not rounded to fp32
        delta = self._stored(self.delta_weight()).to(acc)
        merged = (w.to(acc) + delta).to(w.dtype)
        self._keep_original("weight", w, unmerged=(merged.to(acc) - delta).to(w.dtype))
        w.copy_(merged)
        self.merged = True

    @torch.no_grad()
    @outside_autocast
    def unmerge(self) -> None:
        if self._already(merged=False):
            return
        self.dequantize_base()
        w = self.base.weight
        acc = torch.promote_types(w.dtype, torch.float32)
        w.copy_((w.to(acc) - self._stored(self.delta_weight()).to(acc)).to(w.dtype))
        self._put_back_original("weight", w)
        self.restore_quantized_base()
        self.merged = False


class OriginalValues:
    """Copies of parameters as they were when a method was applied, swapped in while it is disabled.

    For methods that train existing parameters (BitFit's biases, the layer norms of Houlsby adapters):
    disabling them must give the base model, so the trained values step aside and come back after."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = list(params)
        self.originals = [p.detach().clone() for p in self.params]
        self._stash: list[torch.Tensor] | None = None

    def swap_in(self) -> None:
        if self._stash is None:
            self._stash = [p.data for p in self.params]
            for p, o in zip(self.params, self.originals):
                p.data = o.to(device=p.device, dtype=p.dtype)

    def swap_out(self) -> None:
        if self._stash is not None:
            for p, s in zip(self.params, self._stash):
                p.data = s
            self._stash = None


class Method:
    """One delta-tuning method applied to one model. Subclasses set the class attributes.

    Capabilities (class attributes; read them instead of testing a method's name):
    - `mergeable` / `why_not_mergeable`: folds into the weights (merge, merged export);
    - `has_rank`: `spec.rank` means something (labels such as "lora r=8");
    - `shared_fields`: which of MethodSpec's shared fields (targets, rank, alpha, dropout, rslora) the method
      reads; a field set for a combination in which no method reads it is reported (methods/specs.py), since
      it would change nothing (`--method adapter --rank 16` keeps the bottleneck's own width);
    - `adds_virtual_tokens`: every example attends to extra positions (no span-by-span attention);
    - `trains_full_weights`: the base weights themselves train (kept in fp32, sharded under FSDP);
    - `writes_full_model`: the run's output is a whole model, not an adapter (default: the above);
    - `can_disable` / `why_not_disable`: `AdaptedModel.disable_adapters()` can give the base model;
    - `why_not_resume`: non-empty when a checkpoint (trainable tensors only) cannot continue the run;
    - `why_not_gradient_checkpointing`: non-empty when the method cannot train with activation checkpointing.
    Options: `options_schema` (see options.py); `self.options` holds the checked values.
    """

    name: ClassVar[str]
    kind: ClassVar[str]  # "reparameterisation" | "addition" | "specification"
    mergeable: ClassVar[bool] = False
    why_not_mergeable: ClassVar[str] = ""
    has_rank: ClassVar[bool] = False
    shared_fields: ClassVar[frozenset[str]] = frozenset()
    adds_virtual_tokens: ClassVar[bool] = False
    trains_full_weights: ClassVar[bool] = False
    can_disable: ClassVar[bool] = True
    why_not_disable: ClassVar[str] = ""
    peft_type: ClassVar[str | None] = None  # PEFT's name where PEFT has the method
    options_schema: ClassVar[dict[str, Option]] = {}

    def __init__(self, spec: MethodSpec) -> None:
        targets = spec.targets
        if not isinstance(targets, str) and not (
            isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets)
        ):  # a number or a list holding one reached re / str.split: a traceback
            raise ConfigError(
                f"method '{spec.name}': targets must be a name, a pattern or a list of names, got {targets!r}",
                field="targets",
            )
        if isinstance(targets, tuple):  # read as a list everywhere (a tuple reached str.split: a traceback)
            from dataclasses import replace

            spec = replace(spec, targets=list(targets))
        self.spec = spec
        self.options = read_options(self.name, spec.options, self.options_schema)

    @property
    def writes_full_model(self) -> bool:
        return self.trains_full_weights

    @property
    def why_not_resume(self) -> str:
        """Why a run of this method cannot continue from a checkpoint ("" when it can)."""
        return ""

    @property
    def why_not_gradient_checkpointing(self) -> str:
        """Why this method cannot train with gradient checkpointing ("" when it can)."""
        return ""

    def training_warnings(self, model: nn.Module) -> list[str]:
        """Lines `deltatune train` prints once the method is applied: a setting that trains but wastes something
        (only at training, where the user can still change it; not when an adapter is loaded)."""
        return []

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

    def merge_for_unload(self, model: nn.Module) -> None:
        """The merge `merge_and_unload` makes before the wrappers go: its weights leave as plain linears."""
        self.merge(model)

    def unmerge(self, model: nn.Module) -> None:
        if not self.mergeable:
            raise ConfigError(f"method '{self.name}' cannot be merged: {self.why_not_mergeable}")
        for module in self.delta_modules(model):
            module.unmerge()

    def switchable_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules with a `disabled` flag that switches this method off (default: its DeltaLinears)."""
        return list(self.delta_modules(model))

    def set_disabled(self, model: nn.Module, disabled: bool) -> None:
        """Switch the method off (the model computes the base) or back on."""
        if not self.can_disable:
            raise ConfigError(f"method '{self.name}' cannot be disabled: {self.why_not_disable}", field="method")
        for module in self.switchable_modules(model):
            module.disabled = disabled

    def finalize(self, model: nn.Module) -> None:
        """Called once after training, before the final save (e.g. prefix tuning folds its MLP)."""

    def after_step(self, model: nn.Module, step: int) -> list[nn.Parameter]:
        """Called after optimizer step `step` (1-based); returns parameters whose optimizer state the
        loop must reset (ReMoRA's periodic merge-and-reinitialise). Default: nothing."""
        return []

    def lr_factor(self, step: int) -> float:
        """A multiplier on the scheduled learning rate at `step` (ReMoRA's re-warmup). Default: 1."""
        return 1.0

    def prepare_export(self, model: nn.Module) -> None:
        """Called before a merged export; make the model exportable or raise a one-line ConfigError."""

    # --- shared helpers -----------------------------------------------------------------------
    def delta_modules(self, model: nn.Module) -> list[DeltaLinear]:
        """The `DeltaLinear`s this method injected (reparameterisation methods)."""
        return [
            m for m in model.modules() if isinstance(m, DeltaLinear) and getattr(m, "method_name", None) == self.name
        ]

    def named_delta_modules(self, model: nn.Module) -> list[tuple[str, DeltaLinear]]:
        """Like `delta_modules`, with qualified module names."""
        return [
            (n, m)
            for n, m in model.named_modules()
            if isinstance(m, DeltaLinear) and getattr(m, "method_name", None) == self.name
        ]

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Adapter-only weights: the trainable parameters. A method that must save more (VeRA's shared
        frozen matrices) overrides this and adds them."""
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
        return key[len(self.PEFT_PREFIX) :]


class WeightDeltaMethod(Method):
    """A reparameterisation method: one `DeltaLinear` per targeted linear (`make_layer`).

    The NF4 base composes under every such method: option `quantize_base` (and block_size,
    double_quant, compute_dtype, merge_requantize; nf4.py) stores the wrapped linears in 4 bits.
    Merge dequantises first; `merge_requantize` quantises the merged weights again (lossy)."""

    kind = "reparameterisation"
    mergeable = True
    shared_fields = frozenset({"targets"})
    options_schema = dict(NF4_OPTIONS)

    def make_layer(self, base: nn.Module) -> DeltaLinear:
        raise NotImplementedError

    def target_spec(self) -> str | list[str]:
        return self.spec.targets

    def check_spec(self) -> None:
        """One-line errors for bad spec values, before anything is wrapped."""

    @property
    def quant(self) -> QuantOptions | None:
        return quant_options(self.options)

    def apply(self, model: nn.Module) -> None:
        from deltatune.methods.inject import wrap_linears

        self.check_spec()
        wrap_linears(model, self.target_spec(), self.make_layer, self.name)
        if self.quant is not None:
            transposed = [n for n, m in self.named_delta_modules(model) if m.fan_in_fan_out]
            if transposed:
                raise ConfigError(
                    f"quantize_base stores nn.Linear weights in NF4; '{transposed[0]}' is a Conv1D "
                    "(GPT-2's transposed linear), which the NF4 base does not take",
                    field="options.quantize_base",
                )
            from deltatune.methods.apply import untie_adapted_weights

            # a head tied to the embeddings is quantised from its own copy, and the config says it is untied: a
            # merged model's head then differs from the embeddings (the NF4 base has no `.weight` to untie later)
            untie_adapted_weights(model)
            quantize_bases(self.delta_modules(model), self.quant)
            for module in self.delta_modules(model):
                module.base_changed()

    def merge(self, model: nn.Module) -> None:
        super().merge(model)
        if self.quant is not None and self.quant.merge_requantize:
            requantize_bases(self.delta_modules(model), self.quant)

    def merge_for_unload(self, model: nn.Module) -> None:
        """Never requantised: NF4 weights are no transformers model's (its `save_pretrained` wrote NF4 codes,
        which `from_pretrained` dropped for random weights); `merge_requantize` is for a merged adapted model."""
        super().merge(model)


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
        if info.name not in {"base", "inject", "options", "nf4", "virtual_tokens", "specs"}:
            importlib.import_module(f"deltatune.methods.{info.name}")


def get_method(name: str) -> type[Method]:
    _load_builtin_methods()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method '{name}'; choose one of: {', '.join(sorted(_REGISTRY))}", field="method")
    return _REGISTRY[name]


def method_names() -> list[str]:
    _load_builtin_methods()
    return sorted(_REGISTRY)
