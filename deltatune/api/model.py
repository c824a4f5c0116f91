"""Models and methods the PEFT way: load a model, apply a method by name, count, merge, save, load.

Thin on purpose: the work is done by `deltatune.models` (loading), `deltatune.methods.apply`
(applying, merging, adapter files) and `deltatune.analysis.memory` (counting). This module only
turns keyword arguments into method specs and adds the PEFT-style conveniences.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from deltatune.errors import ConfigError, UserError
from deltatune.methods import MethodSpec, get_method
from deltatune.methods.apply import AdaptedModel as _AdaptedModel
from deltatune.methods.apply import apply_methods
from deltatune.methods.apply import load_adapter as _load_adapter
from deltatune.methods.specs import per_method_options, unused_fields

__all__ = ["AdaptedModel", "apply", "load_adapter", "load_model"]

QUANTIZE = ("nf4",)
_QUANTIZE_ATTR = "_deltatune_quantize"  # set by load_model(quantize=...), read by apply()
# what `save_adapter` writes (and PEFT's README): a folder holding only these is an adapter to replace
_ADAPTER_FILES = {"adapter_config.json", "deltatune_adapter.json", "adapter_model.safetensors", "README.md"}


class AdaptedModel(_AdaptedModel):
    """A model with deltatune methods applied (what `deltatune.apply` returns).

    `.model` is the transformers model, changed in place: pass it (or the model you gave `apply`,
    the same object) to your own loop, transformers' `Trainer` or TRL. Calling the AdaptedModel
    calls the model. Besides the methods of `deltatune.methods.apply.AdaptedModel` (`merge`,
    `unmerge`, `merge_and_unload`, `save_adapter`, `trainable_parameters`, ...) it has PEFT's
    `print_trainable_parameters` and a `disabled()` context manager.
    """

    @classmethod
    def _wrap(cls, adapted: _AdaptedModel) -> "AdaptedModel":
        out = cls.__new__(cls)
        out.__dict__.update(adapted.__dict__)  # every attribute the engine's class sets, now or later
        return out

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters, counted as `deltatune plan` counts them (tied weights once)."""
        from deltatune.analysis.memory import parameter_report

        report = parameter_report(self)
        return report.trainable, report.total

    def trainable_parameters_summary(self) -> str:
        """PEFT's line, then trainable parameters per layer type (and per method when there are several)."""
        from deltatune.analysis.memory import parameter_report

        r = parameter_report(self)
        lines = [
            f"trainable params: {r.trainable:,d} || all params: {r.total:,d} || trainable%: {r.percent:.4f}",
            f"  {'layer type':<16} {'trainable':>14}  {'of':>14}",
        ]
        for kind, (total, trainable) in sorted(r.by_type.items(), key=lambda kv: (-kv[1][1], kv[0])):
            if trainable:
                lines.append(f"  {kind:<16} {trainable:>14,}  {total:>14,}")
        if len(r.by_method) > 1:
            lines.append("  by method: " + ", ".join(f"{k} {v:,}" for k, v in r.by_method.items()))
        return "\n".join(lines)

    def print_trainable_parameters(self) -> None:
        """Print PEFT's `trainable params: ... || all params: ... || trainable%: ...` line and the
        per-layer-type table of `deltatune.analysis.memory.parameter_report`."""
        print(self.trainable_parameters_summary())

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Within the block the model computes the base model (PEFT's `disable_adapter()`).

        `disable_adapters()` / `enable_adapters()` do the same as plain calls, as transformers' do. Refused while
        merged (the merged weights hold the adapter)."""
        with self.disable_adapters():
            yield

    def save_adapter(
        self,
        out_dir: str | os.PathLike,
        *,
        base_model_name_or_path: str | None = None,
        overwrite: bool = False,
    ) -> Path:
        """PEFT's format for a single PEFT-representable method, else deltatune's; written atomically.

        The folder is replaced as a whole, so an existing folder that holds anything but an adapter
        (e.g. a trainer's output folder) is refused unless `overwrite=True`."""
        if not self.methods:
            raise ConfigError(
                "this AdaptedModel holds no adapter (merge_and_unload() spent it); save the merged model "
                "with save_pretrained instead",
                field="method",
            )
        path = Path(out_dir).expanduser()
        if not overwrite and (path.exists() or path.is_symlink()):
            if not path.is_dir():
                raise UserError(
                    f"{out_dir}: exists and is not a folder; pass overwrite=True to replace it", field="out_dir"
                )
            others = sorted(p.name for p in path.iterdir() if p.name not in _ADAPTER_FILES)
            if others:
                raise UserError(
                    f"{out_dir}: holds files that are not an adapter's (e.g. '{others[0]}'), and saving replaces "
                    f"the whole folder; choose another folder or pass overwrite=True",
                    field="out_dir",
                )
        return super().save_adapter(path, base_model_name_or_path=base_model_name_or_path)

    def save_pretrained(
        self,
        out_dir: str | os.PathLike,
        *,
        base_model_name_or_path: str | None = None,
        overwrite: bool = False,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        **peft_kwargs: Any,
    ):
        """PEFT's name for `save_adapter`. PEFT's own arguments are read where they mean something here: files are
        always safetensors (safe_serialization=False is refused), one model holds one adapter (selected_adapters
        may name only "default"); the rest (is_main_process, save_embedding_layers, ...) change nothing here."""
        if not safe_serialization:
            raise ConfigError("deltatune saves adapters as safetensors only (safe_serialization=False)", field="save")
        if selected_adapters is not None and list(selected_adapters) != ["default"]:
            raise ConfigError(
                f"this model holds one adapter ('default'); selected_adapters={selected_adapters!r}", field="save"
            )
        if peft_kwargs.get("is_main_process") is False:
            return Path(out_dir)
        return self.save_adapter(out_dir, base_model_name_or_path=base_model_name_or_path, overwrite=overwrite)

    def __getattr__(self, name: str) -> Any:
        """A one-line hint for code written for PEFT's PeftModel, which is a torch module: this is not one."""
        if name.startswith("__") or name in ("model", "methods"):
            raise AttributeError(name)
        if name in _ONE_ADAPTER:  # transformers' own methods of that name fail there ("No adapter loaded")
            raise AttributeError(
                f"AdaptedModel has no '{name}': it holds one adapter (its methods); load another onto a fresh "
                "model with load_adapter, or serve several from one base with `deltatune serve`"
            )
        if hasattr(self.__dict__.get("model"), name):
            raise AttributeError(
                f"AdaptedModel has no attribute '{name}': it is not a torch module; its `.model` is (pass "
                f"adapted.model to a Trainer or TRL, or call adapted.model.{name})"
            )
        raise AttributeError(f"'AdaptedModel' object has no attribute '{name}'")


_ONE_ADAPTER = frozenset({"set_adapter", "add_adapter", "delete_adapter", "active_adapter", "active_adapters"})


def _check_model(model: Any, what: str) -> None:
    """A one-line error for the usual mistakes: an AdaptedModel, a path or a name instead of the model."""
    if isinstance(model, nn.Module):
        return
    if isinstance(model, _AdaptedModel):
        why = "an AdaptedModel already has its methods; pass a fresh model (its `.model` is adapted already)"
    elif isinstance(model, (str, os.PathLike)):
        why = "load it first: model, tokenizer = deltatune.load_model(path)"
    else:
        why = f"got {type(model).__name__}"
    raise ConfigError(f"{what} needs a torch model (nn.Module); {why}", field="model")


def method_specs(
    method: str | MethodSpec | list[MethodSpec],
    *,
    targets: str | list[str] | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    dropout: float | None = None,
    rslora: bool | None = None,
    quantize: str | None = None,
    **options: Any,
) -> list[MethodSpec]:
    """Specs for `method` ("lora", "lora+bitfit", a MethodSpec or a list of them). Keyword
    arguments other than the common ones are the methods' options, as on the command line
    (`--set method_options=...`): a flat one goes to each named method that has it, `lora={...}` to one."""
    if isinstance(method, (MethodSpec, list, tuple)):
        specs = [method] if isinstance(method, MethodSpec) else list(method)
        if not all(isinstance(s, MethodSpec) for s in specs):
            raise ConfigError("a list of methods must hold MethodSpec objects; join names with '+'", field="method")
        given = dict(targets=targets, rank=rank, alpha=alpha, dropout=dropout, rslora=rslora, **options)
        ignored = [k for k, v in given.items() if v is not None]
        if ignored:  # a MethodSpec carries its own settings: a keyword beside it would be ignored
            raise ConfigError(
                f"'{ignored[0]}' is given beside a MethodSpec, which carries its own settings; set it on the "
                f"MethodSpec, or pass the method by name",
                field=ignored[0],
            )
    elif isinstance(method, str):
        names = [n.strip() for n in method.split("+") if n.strip()]
        if not names:
            raise ConfigError("no method given", field="method")
        for n in names:
            get_method(n)  # an unknown name is a ConfigError listing the methods
        given = dict(targets=targets, rank=rank, alpha=alpha, dropout=dropout, rslora=rslora)
        shared = {k: v for k, v in given.items() if v is not None}  # the rest keep MethodSpec's defaults
        for line in unused_fields(names, set(shared), shared):
            warnings.warn(line, stacklevel=3)
        per_method = per_method_options(names, options)  # as the command line: each option to the methods it names
        specs = [MethodSpec(name=n, **shared, options=per_method[n]) for n in names]
    else:
        raise ConfigError(
            f"method must be a name like 'lora' or 'lora+bitfit', got {type(method).__name__}", field="method"
        )
    if quantize is not None:
        quantized = [_on_nf4_base(s) for s in specs]
        if quantized == specs:
            raise ConfigError(
                f"quantize='{quantize}' needs a method that trains on an NF4 base (lora, dora, mora, ia3, vera); "
                f"got {'+'.join(s.name for s in specs)}",
                field="quantize",
            )
        specs = quantized
    return specs


def _on_nf4_base(spec: MethodSpec) -> MethodSpec:
    cls = get_method(spec.name)
    if "quantize_base" in getattr(cls, "options_schema", {}):  # every weight-delta method composes with NF4
        return MethodSpec(**{**spec.to_dict(), "options": {**spec.options, "quantize_base": True}})
    if getattr(cls, "kind", None) == "specification":  # BitFit beside LoRA: trains biases, quantises nothing
        return spec
    raise ConfigError(
        f"method '{spec.name}' cannot train on an NF4 base; use a weight-delta method (lora, dora, mora, ia3, vera)",
        field="quantize",
    )


def apply(
    model: nn.Module,
    method: str | MethodSpec | list[MethodSpec] = "lora",
    *,
    targets: str | list[str] | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    dropout: float | None = None,
    rslora: bool | None = None,
    quantize: str | None = None,
    **options: Any,
) -> AdaptedModel:
    """Freeze `model` and apply `method` in place, like PEFT's `get_peft_model`.

    `method`: a name or a `+` combination as on the command line ("lora", "dora", "lora+bitfit").
    `targets`, `rank`, `alpha`, `dropout`, `rslora` left out take MethodSpec's defaults ("all-linear", 8, 16.0,
    0.0, False); one given that no named method reads (`rank` for "adapter" or "ia3") is warned about.
    `targets`: "all-linear", suffixes "q_proj,v_proj" (or a list), or a regex. `quantize="nf4"`
    trains on an NF4 base (QLoRA); it defaults to what `load_model(quantize=...)` asked for, and
    `quantize="none"` keeps this method's base unquantised on such a model.
    Other keyword arguments are the methods' options (e.g. `init="gaussian"`). Errors in names or
    values raise `deltatune.ConfigError` naming the field.
    """
    _check_model(model, "apply")
    if quantize is None:
        quantize = getattr(model, _QUANTIZE_ATTR, None)
    elif quantize == "none":  # None means "as load_model asked"; this is how to say "not quantised"
        quantize = None
    if quantize is not None and quantize not in QUANTIZE:
        raise ConfigError(
            f"quantize must be one of {', '.join(QUANTIZE)}, 'none' or None, got {quantize!r}", field="quantize"
        )
    specs = method_specs(
        method, targets=targets, rank=rank, alpha=alpha, dropout=dropout, rslora=rslora, quantize=quantize, **options
    )
    return AdaptedModel._wrap(apply_methods(model, specs))


def load_adapter(model: nn.Module, path: str | os.PathLike, *, is_trainable: bool = True) -> AdaptedModel:
    """Apply the methods an adapter folder describes (PEFT's format or deltatune's) and load its weights.
    The added modules take the model's mode (a model in eval mode runs no adapter dropout). On a model from
    `load_model(quantize="nf4")` the adapted linears get their NF4 base, as `apply` gives them.
    `is_trainable=False` freezes the loaded tensors (PEFT's `from_pretrained` default); by default they train on,
    as `apply` leaves them."""
    _check_model(model, "load_adapter")
    on_nf4 = None
    if getattr(model, _QUANTIZE_ATTR, None) is not None:
        on_nf4 = lambda specs: [_on_nf4_base(s) for s in specs]  # noqa: E731
    adapted = AdaptedModel._wrap(_load_adapter(model, path, adjust_specs=on_nf4))
    if not is_trainable:
        for _, p in adapted.trainable_parameters():
            p.requires_grad_(False)
    return adapted


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype = "fp32",
    quantize: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a transformers folder, a GGUF file, or None for the default model
    (SmolLM2-135M-Instruct, no download). `dtype`: "fp32", "bf16", "fp16" or a torch dtype.

    `quantize="nf4"`: the linears that `apply` adapts get an NF4 base (QLoRA), quantised when
    `apply` runs, since deltatune quantises exactly the layers an adapter wraps.
    """
    from deltatune.models import load_model as _load

    if quantize is not None and quantize not in QUANTIZE:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE)} or None, got {quantize!r}", field="quantize")
    model, tokenizer = _load(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
    if quantize is not None:
        setattr(model, _QUANTIZE_ATTR, quantize)
    return model, tokenizer
