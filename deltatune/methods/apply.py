"""Apply one or several methods to a model, and everything done with the result: the trainable
parameters, merge and unmerge, adapter weights in memory and on disk, and merged export.

The model is changed in place (like PEFT): it is frozen, then each method injects its modules or
marks its parameters, in the order given. Each method claims its parameters; two methods claiming
the same parameter, or wrapping the same linear, is a ConfigError, so that "lora + bitfit" works and
"lora + dora on the same layers" fails with a reason instead of training something ambiguous.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.methods.base import DeltaLinear, Method, MethodSpec, get_method
from deltatune.methods.inject import freeze


class AdaptedModel:
    """A model with delta-tuning methods applied. `.model` is the (changed) transformers model."""

    def __init__(self, model: nn.Module, methods: list[Method]) -> None:
        self.model = model
        self.methods = methods

    # --- what trains --------------------------------------------------------------------------
    @property
    def specs(self) -> list[MethodSpec]:
        return [m.spec for m in self.methods]

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) for every trained parameter, method by method, in a stable order."""
        return [np for m in self.methods for np in m.trainable_parameters(self.model)]

    @property
    def is_peft_method(self) -> bool:
        """True when the adapter is saved in PEFT's format (one method that PEFT can represent, on modules a
        transformers model has: an upcycled model's experts and routers are stacked or renamed in its transformers
        export, so PEFT would drop their tensors with a warning and compute another model)."""
        return (
            len(self.methods) == 1
            and self.methods[0].peft_type is not None
            and not self._adapts_upcycled_experts()
            and self.methods[0].peft_config(self.model) is not None
        )

    def _adapts_upcycled_experts(self) -> bool:
        blocks = [name for name, m in self.model.named_modules() if type(m).__name__ == "MoEBlock"]
        return any(
            name.startswith(f"{block}.")
            for name, _ in self.methods[0].named_delta_modules(self.model)
            for block in blocks
        )

    @property
    def mergeable(self) -> bool:
        return all(m.mergeable for m in self.methods)

    def _require_mergeable(self) -> None:
        for m in self.methods:
            if not m.mergeable:
                raise ConfigError(f"method '{m.name}' cannot be merged: {m.why_not_mergeable}", field="method")

    # --- merge --------------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold every method's change into the base weights (in place; `unmerge` undoes it). A weight
        tied to another (an adapted `lm_head` tied to the input embeddings) is untied first, so the
        merge changes the adapted layer only."""
        self._require_mergeable()
        untie_adapted_weights(self.model)
        for m in self.methods:
            m.merge(self.model)

    def unmerge(self) -> None:
        self._require_mergeable()
        for m in reversed(self.methods):
            m.unmerge(self.model)

    def merge_and_unload(self) -> nn.Module:
        """Merge layer by layer and swap each wrapper back for its base linear: the result is a plain
        transformers model (no extra copy of the weights is made). This AdaptedModel is spent after.

        Its config describes it (BitFit's added biases turn on the bias flags), so `save_pretrained`
        and `from_pretrained` give the same model back; what no config can describe is refused here."""
        self._require_mergeable()
        for m in self.methods:  # first: a refusal here leaves the model as it was (the head still tied)
            m.prepare_export(self.model)
        untie_adapted_weights(self.model)
        for m in self.methods:
            m.merge_for_unload(self.model)
            m.unload(self.model)
        self.methods = []
        self.model.__dict__.pop(APPLIED_ATTR, None)  # a plain model again: methods may be applied to it
        return self.model

    def disable_adapters(self) -> "_AdaptersOff":
        """The model computes exactly the base model, whatever the methods' kind (each method's `set_disabled`
        hook), until `enable_adapters()`, as transformers' `model.disable_adapters()`; as a context manager
        (`with adapted.disable_adapters():`), until the block ends. Refused while merged: the merged weights hold
        the change, so switching the adapter off would change nothing. (It was a context manager only: called
        plainly, as transformers' is, it did nothing.)"""
        if any(getattr(module, "merged", False) for module in self.model.modules()):
            raise ConfigError(
                "the adapter is merged into the weights; unmerge() it before disabling it", field="method"
            )
        for m in self.methods:
            if not m.can_disable:
                raise ConfigError(f"method '{m.name}' cannot be disabled: {m.why_not_disable}", field="method")
        off = self.__dict__.setdefault("_switched_off", [])
        try:
            for m in self.methods:
                if m not in off:
                    m.set_disabled(self.model, True)
                    off.append(m)
        except BaseException:
            self.enable_adapters()
            raise
        return _AdaptersOff(self)

    def enable_adapters(self) -> None:
        """The adapted model again after `disable_adapters()` (nothing to do if it was not disabled)."""
        off = self.__dict__.get("_switched_off", [])
        while off:
            off.pop().set_disabled(self.model, False)

    # --- capabilities of the combination --------------------------------------------------------
    @property
    def adds_virtual_tokens(self) -> bool:
        return any(m.adds_virtual_tokens for m in self.methods)

    @property
    def writes_full_model(self) -> bool:
        return any(m.writes_full_model for m in self.methods)

    def finalize(self) -> None:
        """Each method's after-training hook (before the final save)."""
        for m in self.methods:
            m.finalize(self.model)

    # --- adapter weights ----------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors, keyed by their names in `model.named_parameters()` (no copies)."""
        out: dict[str, torch.Tensor] = {}
        for m in self.methods:
            out.update(m.state_dict(self.model))
        return out

    @torch.no_grad()
    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], *, source: str | None = None) -> None:
        """Copy adapter tensors in by name; missing, unexpected or mis-shaped tensors are a ConfigError."""
        own = self.adapter_state_dict()
        state = self._without_saved_base_layers(state, source)
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing:
            raise ConfigError(
                f"adapter lacks {len(missing)} tensor(s) the model needs, e.g. '{missing[0]}'", file=source
            )
        if unexpected:
            raise ConfigError(
                f"adapter has {len(unexpected)} tensor(s) the model lacks, e.g. '{unexpected[0]}'", file=source
            )
        for name, target in own.items():
            value = state[name]
            if value.shape != target.shape:
                raise ConfigError(
                    f"tensor '{name}' has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}",
                    file=source,
                )
            target.copy_(value.to(device=target.device, dtype=target.dtype))

    def _without_saved_base_layers(self, state: dict[str, torch.Tensor], source: str | None) -> dict[str, torch.Tensor]:
        """`state` less the frozen base weight PEFT saves beside an adapted output head (`lm_head.base_layer.weight`:
        PEFT's `save_embedding_layers`, on whenever `lm_head` is a target): it is the base's own weight, so it is
        checked against the model's and dropped. Different values (a resized or retrained vocabulary) are refused:
        loading them would change the base itself, which an adapter here never does."""
        suffix = ".base_layer.weight"
        modules = dict(self.model.named_modules())
        out = {}
        for name, value in state.items():
            layer = modules.get(name[: -len(suffix)]) if name.endswith(suffix) else None
            if not isinstance(layer, DeltaLinear):
                out[name] = value
                continue
            weight = layer.base_weight(layer.weight.dtype if not layer.base_is_quantized else torch.float32)
            if weight.device.type == "meta":
                continue
            saved = layer._stored(value.to(weight.device))  # PEFT saves it as the layer stores it
            # compare in the coarser of the two dtypes: a bf16 copy of an fp32 base is the same base
            coarse = max((weight.dtype, saved.dtype), key=lambda d: torch.finfo(d).eps)
            if saved.shape != weight.shape or not torch.equal(weight.to(coarse), saved.to(coarse)):
                raise ConfigError(
                    f"tensor '{name}' holds base weights other than the model's (a resized or retrained "
                    "vocabulary?); deltatune loads an adapter only over the base it was trained on",
                    file=source,
                )
        return out

    def save_adapter(self, out_dir: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> Path:
        """PEFT's format for a single PEFT-representable method, else deltatune's; written atomically."""
        from deltatune.methods.peft_format import save_adapter

        return save_adapter(self, out_dir, base_model_name_or_path=base_model_name_or_path)

    def __repr__(self) -> str:
        return f"AdaptedModel(methods={[m.name for m in self.methods]}, model={type(self.model).__name__})"


def untie_adapted_weights(model: nn.Module) -> bool:
    """Give each adapted linear whose weight is shared with another module (transformers ties `lm_head`
    to the input embeddings) its own copy, and turn the config's tie off, so that merging into it does
    not change the embeddings too, and a saved merged model keeps the two apart. True if anything was
    untied."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    untied = False
    for module in model.modules():
        if not isinstance(module, DeltaLinear) or module.merged:
            continue
        weight = getattr(module.base, "weight", None)
        if isinstance(weight, nn.Parameter) and uses.get(id(weight), 0) > 1:
            module.base.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
            untied = True
    config = getattr(model, "config", None)
    if untied and config is not None:
        for cfg in {id(c): c for c in (config, _text_config(config))}.values():
            if hasattr(cfg, "tie_word_embeddings"):
                cfg.tie_word_embeddings = False
    return untied


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _as_spec(spec: MethodSpec | str) -> MethodSpec:
    return MethodSpec(name=spec) if isinstance(spec, str) else spec


APPLIED_ATTR = "_deltatune_methods"  # the method names an apply_methods call left on the model


class _AdaptersOff:
    """What `disable_adapters()` returns: the adapters are off already; leaving a `with` block turns them on."""

    def __init__(self, adapted: AdaptedModel) -> None:
        self.adapted = adapted

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self.adapted.enable_adapters()


def apply_methods(model: nn.Module, specs: list[MethodSpec | str] | MethodSpec | str) -> AdaptedModel:
    """Freeze `model`, apply each method in order, and check that no two claim the same parameter."""
    if isinstance(specs, (MethodSpec, str)):
        specs = [specs]
    specs = [_as_spec(s) for s in specs]
    if not specs:
        raise ConfigError("no method given", field="method")
    names = [s.name for s in specs]
    for n in names:
        if names.count(n) > 1:
            raise ConfigError(f"method '{n}' is given twice; give it once with all its targets", field="method")
    methods: list[Method] = [get_method(spec.name)(spec) for spec in specs]  # options checked before any change
    earlier = getattr(model, APPLIED_ATTR, None)
    if earlier:  # a second call froze the first one's parameters (or refused with "a later method froze it")
        together = "+".join(dict.fromkeys([*earlier, *names]))
        raise ConfigError(
            f"the model already carries {'+'.join(earlier)} from an earlier call; give every method, with all its "
            f"targets, in one call ('{together}'), or merge_and_unload() first to train on the merged weights",
            field="method",
        )
    peft_layer = next(((n, m) for n, m in model.named_modules() if type(m).__module__.startswith("peft.")), None)
    if peft_layer is not None:  # its lora_A/base_layer children were adapted as plain linears, silently
        kind = type(peft_layer[1])
        raise ConfigError(
            f"the model already carries PEFT adapter layers ('{peft_layer[0] or 'the model'}' is "
            f"{kind.__module__}.{kind.__name__}); "
            "call merge_and_unload() on the PEFT model first, or load a PEFT adapter folder with deltatune "
            "(load_adapter / --adapter), which reads PEFT's format",
            field="method",
        )
    before = {id(m) for m in model.modules()}
    snapshot = _Structure(model)
    try:
        freeze(model)
        for method in methods:
            method.apply(model)
        _check_claims(model, methods)
        # an adapted head tied to the embeddings gets its own copy of the weight, and the config says untied:
        # shared under another name (`lm_head.base.weight`), transformers' save_pretrained (a Trainer's
        # checkpoints) refused the model, and merging into it would change the embeddings too
        untie_adapted_weights(model)
    except BaseException:
        snapshot.restore()  # a refused combination leaves the model as it was, not half adapted
        raise
    for module in model.modules():  # new modules start in training mode: an eval model runs no adapter dropout
        if id(module) not in before:
            module.training = model.training
    object.__setattr__(model, APPLIED_ATTR, names)  # a plain attribute: not a module, parameter or buffer
    return AdaptedModel(model, methods)


class _Structure:
    """What applying methods changes in a model, to put back when it fails: each module's children, parameters,
    buffers and hooks (the dicts, not the tensors: methods wrap and add, they do not write into base weights), each
    parameter's requires_grad, and each module's mode."""

    _DICTS = (
        "_modules",
        "_parameters",
        "_buffers",
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
    )

    def __init__(self, model: nn.Module) -> None:
        self.modules = [
            (m, {d: dict(getattr(m, d)) for d in self._DICTS if hasattr(m, d)}, m.training) for m in model.modules()
        ]
        self.grads = [(p, p.requires_grad) for p in model.parameters()]
        config = getattr(model, "config", None)  # `untie_adapted_weights` turns the tie off
        configs = {id(c): c for c in (config, _text_config(config)) if c is not None}.values() if config else []
        self.ties = [(c, c.tie_word_embeddings) for c in configs if hasattr(c, "tie_word_embeddings")]

    def restore(self) -> None:
        for config, tie in self.ties:
            config.tie_word_embeddings = tie
        for module, dicts, training in self.modules:
            for name, saved in dicts.items():
                current = getattr(module, name)
                current.clear()
                current.update(saved)
            module.training = training
        for p, requires_grad in self.grads:
            p.requires_grad_(requires_grad)


def _check_claims(model: nn.Module, methods: list[Method]) -> None:
    owner: dict[int, tuple[str, str]] = {}
    for m in methods:
        for name, p in m.trainable_parameters(model):
            if id(p) in owner:
                other, other_name = owner[id(p)]
                raise ConfigError(
                    f"methods '{other}' and '{m.name}' both train '{name}'; choose disjoint targets", field="method"
                )
            owner[id(p)] = (m.name, name)
            if not p.requires_grad:
                raise ConfigError(
                    f"method '{m.name}' trains '{name}', but a later method froze it "
                    f"(it wraps that layer); choose disjoint targets",
                    field="method",
                )
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owner]
    if stray:
        raise RuntimeError(f"parameters train without a method claiming them, e.g. '{stray[0]}'")


def load_adapter(
    model: nn.Module,
    adapter_dir: str | os.PathLike,
    *,
    trainable_dtype: torch.dtype | None = None,
    adjust_specs: Callable[[list[MethodSpec]], list[MethodSpec]] | None = None,
) -> AdaptedModel:
    """Apply the methods an adapter folder describes (PEFT's or deltatune's format) and load its weights.

    The adapter's tensors are held in `trainable_dtype` if given; otherwise each keeps the precision it was saved
    in where that is finer than the base's (an fp32 adapter over a bf16 base stays fp32, as training held it and as
    PEFT's `autocast_adapter_dtype` does): nothing saved is rounded on the way in, unless the adapter's
    `adapter_dtype` option names a dtype.
    `adjust_specs` changes how the file's methods are applied, not their tensors (the API's NF4 base).
    """
    from deltatune.methods.peft_format import narrow_peft_targets, read_adapter

    specs, state, key_map, source = read_adapter(adapter_dir)
    if key_map is not None:
        specs = narrow_peft_targets(model, specs)
    check_adapter_tensors(model, specs, state, peft_keys=key_map is not None, source=source)
    if adjust_specs is not None:
        specs = adjust_specs(specs)
    snapshot = _Structure(model)
    adapted = apply_methods(model, specs)
    try:
        if trainable_dtype is not None:
            with torch.no_grad():
                for _, p in adapted.trainable_parameters():
                    p.data = p.data.to(trainable_dtype)
        if key_map is not None:  # PEFT keys -> our names, through the method's hook
            method = adapted.methods[0]
            state = {method.from_peft_key(k): v for k, v in state.items()}
        if trainable_dtype is None:
            hold_in_saved_precision(adapted, state)
        adapted.load_adapter_state_dict(state, source=source)
    except BaseException:
        snapshot.restore()  # a refused adapter leaves the model as it was, ready for the right one
        raise
    return adapted


def check_adapter_tensors(
    model: nn.Module, specs: list[MethodSpec], state: dict[str, torch.Tensor], *, peft_keys: bool, source: str
) -> None:
    """Refuse an adapter file whose tensors are not what its config builds (missing, extra, another shape) before
    anything is built for real: the methods are applied to a copy of `model` on the meta device, so a config whose
    rank is enormous allocates nothing, and the model is not touched. A model dispatched by accelerate (its hooks
    hold offloaded weights a copy would load) is checked when the adapter loads instead."""
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        return
    try:
        shapes_only = meta_copy(model)
    except Exception:  # noqa: BLE001 - a model deepcopy cannot copy: checked when the adapter loads instead
        return
    dry = apply_methods(shapes_only, specs)
    if peft_keys:
        state = {dry.methods[0].from_peft_key(k): v for k, v in state.items()}
    dry.load_adapter_state_dict({k: v.to("meta") for k, v in state.items()}, source=source)


def meta_copy(model: nn.Module) -> nn.Module:
    """`model`'s structure with every parameter and buffer on the meta device (shapes and dtypes, no storage)."""
    memo: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


@torch.no_grad()
def hold_in_saved_precision(adapted: AdaptedModel, state: dict[str, torch.Tensor]) -> None:
    """Give each adapter tensor the dtype it was saved in where that is finer than the one it was built in: a
    LoRA update of early training is mostly below half a bf16 step, so rounding it to a bf16 base's dtype loses
    much of what it does (docs/benchmarks.md, the merged-forward section)."""
    for method in adapted.methods:
        if method.options.get("adapter_dtype", "auto") != "auto":
            continue  # asked for by name: built so
        if not (method.named_delta_modules(adapted.model) or method.adds_virtual_tokens):
            continue  # BitFit's biases, bottleneck adapters: their forward takes the activations' dtype as it is
        for name, param in method.trainable_parameters(adapted.model):
            saved = state.get(name)
            if saved is None or not (saved.is_floating_point() and param.is_floating_point()):
                continue
            if torch.finfo(saved.dtype).eps < torch.finfo(param.dtype).eps:
                param.data = param.data.to(saved.dtype)


def export_merged(
    adapted: AdaptedModel, tokenizer, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> Path:
    """Merge (layer by layer, in place) and write a transformers safetensors folder, atomically.

    `dtype`: cast after merging (merge in fp32, save in bf16: one rounding). The merged model must
    have exactly the parameters its config describes (a method that adds tensors the architecture
    lacks would otherwise be dropped silently by `from_pretrained`).
    """
    from deltatune.models import save_model

    model = adapted.merge_and_unload()  # BitFit turns on the config's bias flags there, or refuses at once
    if not any(type(m).__name__ == "MoEBlock" for m in model.modules()):  # upcycled: checked by its own saver
        _check_plain(model)
    if dtype is not None:
        model = model.to(dtype)
    return save_model(model, tokenizer, out_dir)


def _check_plain(model: nn.Module) -> None:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(model.config)
    ours, theirs = set(model.state_dict()), set(reference.state_dict())
    extra, lacking = sorted(ours - theirs), sorted(theirs - ours)
    if extra or lacking:
        what = f"extra tensor '{extra[0]}'" if extra else f"missing tensor '{lacking[0]}'"
        raise ConfigError(
            f"the merged model does not match its architecture's config ({what}); "
            "save the adapter instead of a merged model",
            field="method",
        )
