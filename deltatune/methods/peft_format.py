"""Adapter folders on disk: PEFT's format where PEFT has the method, deltatune's otherwise.

PEFT format (read by `peft.PeftModel.from_pretrained` and the rest of the ecosystem):
  adapter_config.json        common fields + the method's `Method.peft_config(model)` fields
  adapter_model.safetensors  keys from `Method.to_peft_key(name)`, e.g.
                             base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
deltatune format (several methods, or methods PEFT lacks):
  deltatune_adapter.json     {"format": "deltatune-adapter", "version": 1, "methods": [MethodSpec...]}
  adapter_model.safetensors  keys as in `model.named_parameters()`

Folders are written under a temporary name beside the target and renamed into place, so a crash
never leaves a half-written adapter.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deltatune.errors import ConfigError, UserError
from deltatune.fileio import atomic_dir, unreadable_safetensors
from deltatune.methods.base import _REGISTRY, MethodSpec, _load_builtin_methods

if TYPE_CHECKING:
    from deltatune.methods.apply import AdaptedModel

WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
DELTATUNE_CONFIG = "deltatune_adapter.json"
FORMAT = "deltatune-adapter"
VERSION = 1


def peft_target_modules(model: nn.Module, adapted: list[str]) -> list[str]:
    """PEFT's `target_modules` for the modules we adapted: the short suffixes ("q_proj") when those
    select exactly our set in this model, else the full module names (PEFT matches those exactly)."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    selected = {n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in suffixes}
    return suffixes if selected == set(adapted) else sorted(adapted)


def _base_name(adapted: "AdaptedModel", given: str | None) -> str | None:
    """The base to record: a local folder as an absolute path (a relative one was resolved later against the
    directory `merge`/`export`/`eval` ran in, finding another model or none); a hub id as given."""
    name = given
    if name is None:
        name = getattr(getattr(adapted.model, "config", None), "_name_or_path", None) or getattr(
            adapted.model, "name_or_path", None
        )
    if not name:
        return None
    path = Path(str(name)).expanduser()
    return str(path.resolve()) if not path.is_absolute() and path.is_dir() else str(name)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def save_adapter(
    adapted: "AdaptedModel", out_dir: str | os.PathLike, *, base_model_name_or_path: str | None = None
) -> Path:
    base = _base_name(adapted, base_model_name_or_path)
    state = adapted.adapter_state_dict()
    card = Path(out_dir) / "README.md"  # a model card written there (by hand, by PEFT) stays: the folder is replaced
    with atomic_dir(out_dir) as tmp:
        if card.is_file():
            shutil.copy2(card, tmp / "README.md")
        if adapted.is_peft_method:
            method = adapted.methods[0]
            config = {
                "task_type": "CAUSAL_LM",
                "peft_type": method.peft_type,
                "auto_mapping": None,
                "base_model_name_or_path": base,
                "revision": None,
                "inference_mode": True,
            }
            config.update(method.peft_config(adapted.model) or {})
            _write_json(tmp / PEFT_CONFIG, config)
            _save_tensors({method.to_peft_key(k): v for k, v in state.items()}, tmp / WEIGHTS)
        else:
            _write_json(
                tmp / DELTATUNE_CONFIG,
                {
                    "format": FORMAT,
                    "version": VERSION,
                    "base_model_name_or_path": base,
                    "methods": [s.to_dict() for s in adapted.specs],
                },
            )
            _save_tensors(state, tmp / WEIGHTS)
    return Path(out_dir)


def adapter_base_model(adapter_dir: str | os.PathLike) -> str | None:
    """The base model an adapter folder names (`base_model_name_or_path`), if any."""
    path, config = _read_config(Path(adapter_dir))
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):  # Path(5) was a TypeError traceback in merge/export
        raise ConfigError(
            f"expected a model folder or hub id, got {base!r}", file=str(path), field="base_model_name_or_path"
        )
    return base


def _read_config(folder: Path) -> tuple[Path, dict[str, Any]]:
    if not folder.is_dir():
        why = "is a file, not an adapter folder" if folder.exists() else "no such adapter folder"
        raise UserError(f"{folder}: {why}", field="adapter")
    for name in (DELTATUNE_CONFIG, PEFT_CONFIG):
        path = folder / name
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ConfigError(f"invalid JSON: {exc.msg}", file=str(path), line=exc.lineno) from exc
            if not isinstance(data, dict):
                raise ConfigError("expected a JSON object", file=str(path))
            return path, data
    inside = [f"{folder / sub}" for sub in ("final", "best") if (folder / sub / PEFT_CONFIG).is_file()]
    inside += [f"{folder / sub}" for sub in ("final", "best") if (folder / sub / DELTATUNE_CONFIG).is_file()]
    hint = f"; a training run's adapter is its {inside[0]}" if inside else "; is it an adapter folder?"
    raise UserError(f"{folder}: no {PEFT_CONFIG} or {DELTATUNE_CONFIG}{hint}", field="adapter")


def peft_option_set(config: dict[str, Any], key: str) -> bool:
    """Whether a PEFT config sets `key` to something other than PEFT's empty defaults (None, False, [], {}, "").
    A plain truth test is not enough: `layers_to_transform: 0` (only the first layer) is falsy."""
    value = config.get(key)
    return value is not None and value is not False and value not in ([], {}, "")


def refuse_peft_options(config: dict[str, Any], method: str, keys: tuple[str, ...]) -> None:
    """A one-line ConfigError naming the first of `keys` this PEFT config sets: deltatune would not reproduce it."""
    for key in keys:
        if peft_option_set(config, key):
            raise ConfigError(f"PEFT {method} option {key}={config[key]!r} is not supported by deltatune", field=key)


_MISSING = object()


def peft_number(config: dict[str, Any], key: str, *, integer: bool = False, default: Any = _MISSING) -> Any:
    """A number of a PEFT adapter_config.json, or a one-line error naming the key (int("four") was a ValueError
    traceback, a missing "r" a KeyError; the server answered 500)."""
    value = config.get(key)
    if value is None:
        if default is _MISSING:
            raise ConfigError("missing", field=key)
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ConfigError(f"expected {'an integer' if integer else 'a number'}, got {value!r}", field=key)
    return value if integer else float(value)


def peft_flag(config: dict[str, Any], key: str) -> bool:
    """A true/false option of a PEFT config (absent: false); the string "false" was read as true."""
    value = config.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ConfigError(f"expected true or false, got {value!r}", field=key)
    return value


def specs_from_peft_config(config: dict[str, Any], *, source: str | None = None) -> MethodSpec:
    """Ask each registered method with this `peft_type` to claim the config (first one wins)."""
    _load_builtin_methods()
    peft_type = config.get("peft_type")
    candidates = [cls for cls in _REGISTRY.values() if cls.peft_type == peft_type]
    for cls in candidates:
        try:
            spec = cls.from_peft_config(config)
        except ConfigError as exc:
            raise ConfigError(str(exc), file=source) from exc
        except (KeyError, TypeError, ValueError) as exc:  # a value of another type than PEFT writes
            raise ConfigError(
                f"a missing or malformed {peft_type} setting ({type(exc).__name__}: {exc})", file=source
            ) from None
        if spec is not None:
            return spec
    known = sorted({c.peft_type for c in _REGISTRY.values() if c.peft_type})
    raise ConfigError(
        f"PEFT adapter type {peft_type!r} is not supported; supported: {', '.join(known)}",
        file=source,
        field="peft_type",
    )


PICKLED_WEIGHTS = "adapter_model.bin"  # PEFT's file with safe_serialization=False (and before safetensors)


def _load_pickled_weights(path: Path) -> dict[str, torch.Tensor]:
    """A PEFT adapter saved as a torch pickle, read with `weights_only=True`: tensors and plain containers only,
    no code runs (anything else is refused by torch and named here)."""
    try:
        tensors = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle's, torch's or the unpickler's refusal of a non-tensor object
        raise UserError(
            f"{path}: not a readable weights-only torch file ({str(exc).splitlines()[0][:80]})", field="adapter"
        ) from None
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise UserError(f"{path}: expected a mapping of names to tensors", field="adapter")
    return tensors


def narrow_peft_targets(model: nn.Module, specs: list[MethodSpec]) -> list[MethodSpec]:
    """A PEFT file's list of `target_modules` as PEFT reads it: a name no module of `model` has is passed over
    (adapters made with one list for several architectures name modules this one lacks), where a list the user
    typed is checked name by name. A list that matches nothing is left whole, for the usual error."""
    from dataclasses import replace

    from deltatune.methods.inject import named_by

    names = [n for n, _ in model.named_modules() if n]
    narrowed = []
    for spec in specs:
        if isinstance(spec.targets, list):
            present = [t for t in spec.targets if any(named_by(n, t) for n in names)]
            if present:
                spec = replace(spec, targets=present)
        narrowed.append(spec)
    return narrowed


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[list[MethodSpec], dict[str, torch.Tensor], bool | None, str]:
    """(specs, tensors, True if keys are PEFT's else None, config path) of an adapter folder."""
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    path, config = _read_config(folder)
    if path.name == DELTATUNE_CONFIG:
        if config.get("format") != FORMAT:
            raise ConfigError(f"'format' must be '{FORMAT}'", file=str(path), field="format")
        if config.get("version") != VERSION:
            raise ConfigError(
                f"unsupported version {config.get('version')!r} (this deltatune reads {VERSION})",
                file=str(path),
                field="version",
            )
        raw = config.get("methods")
        if not isinstance(raw, list) or not raw or not all(isinstance(m, dict) for m in raw):
            raise ConfigError("'methods' must be a non-empty list of objects", file=str(path), field="methods")
        specs, peft_keys = [MethodSpec.from_dict(m, file=str(path)) for m in raw], None
    else:
        specs, peft_keys = [specs_from_peft_config(config, source=str(path))], True
    weights = folder / WEIGHTS
    if not weights.exists() and peft_keys and (folder / PICKLED_WEIGHTS).exists():
        weights = folder / PICKLED_WEIGHTS
        tensors = _load_pickled_weights(weights)
    elif not weights.exists():
        raise UserError(f"{weights}: missing adapter weights", field="adapter")
    else:
        try:
            tensors = load_file(str(weights))
        except Exception as exc:  # safetensors' own error type, or OSError
            raise unreadable_safetensors(weights, exc, "adapter") from None
    _check_finite(weights, tensors)
    return specs, tensors, peft_keys, str(path)


def _check_finite(weights: Path, tensors: dict[str, torch.Tensor]) -> None:
    """An adapter holding NaN or inf (a run that diverged, a damaged file) is refused where it is read: loaded, it
    made every answer NaN, and a server's sampler then failed the whole batch it shared with other adapters."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{weights}: tensor '{key}' holds NaN or infinite values", field="adapter")
