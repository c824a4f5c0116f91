"""Save and load upcycled models.

Top-k models of Llama sources are written as transformers MoE folders, so that
`AutoModelForCausalLM.from_pretrained` loads them with the same logits as deltatune:
- Mixtral when every layer is MoE and the top-k weights are renormalised (Mixtral always
  renormalises, so the raw-softmax default cannot be expressed in it);
- Qwen2-MoE otherwise (its `norm_topk_prob` switch covers raw and renormalised weights and
  `mlp_only_layers` keeps the dense layers); the attention has no q/k/v bias (`qkv_bias: false`)
  and the shared expert has zero width, so it adds exactly 0.
Neither has a capacity limit, which matches deltatune at inference (top-k drops only while training).
Expert-choice models, and sources that are not Llama, are saved in deltatune's own format: the dense
config.json plus `upcycled.safetensors` (not model.safetensors, so transformers cannot silently load
a dense model from it). Every upcycled folder has `upcycle.json`, which `deltatune.models.load_model`
looks for; it loads any of the three back into deltatune's modules (experts as nn.Linear, so the
method injection can target them).
"""

from __future__ import annotations

import copy
import json
import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from deltatune.errors import UserError
from deltatune.fileio import atomic_dir
from deltatune.upcycle.convert import UpcycleSpec, decoder_layers, spec_of, upcycle, validate
from deltatune.upcycle.moe import DEFAULT_AUX_WEIGHT, ROUTERS, moe_blocks

UPCYCLE_FILE = "upcycle.json"
WEIGHTS_FILE = "upcycled.safetensors"


def is_upcycled_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / UPCYCLE_FILE).is_file()


def export_format(model: nn.Module, spec: UpcycleSpec) -> tuple[str, str]:
    """('mixtral' | 'qwen2_moe' | 'deltatune', why) for this model."""
    cfg = model.config
    if spec.router != "topk":
        return "deltatune", "expert-choice routing has no transformers architecture"
    if cfg.model_type != "llama":
        return "deltatune", f"the source is {cfg.model_type}, not Llama"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "deltatune", "the source has attention or MLP biases"
    n = cfg.num_hidden_layers
    if spec.normalize and sorted(spec.layers) == list(range(n)):
        return "mixtral", "every layer is MoE with renormalised top-k weights"
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        return "deltatune", "Qwen2-MoE cannot express a head_dim other than hidden/heads"
    return "qwen2_moe", "dense layers between MoE layers or raw softmax weights (Mixtral has neither)"


def _common_config(cfg) -> dict:
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_act",
        "max_position_embeddings",
        "initializer_range",
        "rms_norm_eps",
        "tie_word_embeddings",
        "rope_parameters",
        "attention_dropout",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
    )
    return {k: getattr(cfg, k) for k in keys if hasattr(cfg, k)}


# Qwen2-MoE always builds a shared expert; deltatune's MoE has none. One unit wide with every weight zero it adds
# exactly 0 and all its gradients are 0 (a fixed point of training). Zero width (before 2026-12-07) made torch warn
# "Initializing zero-element tensors is a no-op" on every from_pretrained of the export.
SHARED_EXPERT_WIDTH = 1


def hf_config(model: nn.Module, spec: UpcycleSpec, fmt: str):
    from transformers import MixtralConfig, Qwen2MoeConfig

    cfg = model.config
    common = {**_common_config(cfg), "router_aux_loss_coef": transformers_aux_coef(model, spec)}
    expert_width = cfg.intermediate_size
    if fmt == "mixtral":
        return MixtralConfig(
            **common,
            head_dim=getattr(cfg, "head_dim", None),
            num_local_experts=spec.experts,
            num_experts_per_tok=spec.k,
            sliding_window=None,
            router_jitter_noise=0.0,
        )
    dense_layers = [i for i in range(cfg.num_hidden_layers) if i not in spec.layers]
    return Qwen2MoeConfig(
        **common,
        num_experts=spec.experts,
        num_experts_per_tok=spec.k,
        moe_intermediate_size=expert_width,
        shared_expert_intermediate_size=SHARED_EXPERT_WIDTH,
        norm_topk_prob=spec.normalize,
        mlp_only_layers=dense_layers,
        decoder_sparse_step=1,
        qkv_bias=False,
        use_sliding_window=False,
    )


def transformers_aux_coef(model: nn.Module, spec: UpcycleSpec) -> float:
    """transformers' `router_aux_loss_coef` with deltatune's balancing strength: its load_balancing_loss_func
    takes f_e as the fraction of tokens (summing to k), ours the fraction of assignments (summing to 1), so
    its loss is k times ours and the same pull needs 1/k of the weight. The weight is the one the blocks
    last trained with (RouterLosses records it), else the train default."""
    return trained_aux_weight(model) / spec.k


def trained_aux_weight(model: nn.Module) -> float:
    """The balancing weight the MoE blocks last trained with (RouterLosses records it), else the train default."""
    blocks = moe_blocks(model)
    return float(blocks[0][1].aux_loss_weight) if blocks else DEFAULT_AUX_WEIGHT


def _restore_aux_weight(model: nn.Module, meta: dict, path: Path) -> None:
    """Give the loaded blocks the balancing weight they were saved with, so that saving the model again exports
    the same router_aux_loss_coef (it fell back to the default). Folders written before upcycle.json recorded it:
    the transformers config's coefficient times k, or the default for deltatune's format."""
    weight = meta.get("aux_loss_weight")
    if weight is None and meta["format"] != "deltatune":
        coef = _json_field(path / "config.json", "router_aux_loss_coef")
        weight = coef * meta["spec"].k if _is_number(coef) else None
    for _, block in moe_blocks(model):
        block.aux_loss_weight = DEFAULT_AUX_WEIGHT if weight is None else float(weight)


def _json_field(file: Path, key: str) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None  # the load itself reported a damaged config.json already


def to_hf_state(model: nn.Module, spec: UpcycleSpec) -> dict[str, torch.Tensor]:
    """deltatune's state dict in the transformers MoE layout (experts stacked as 3D tensors)."""
    sd = {k: v for k, v in model.state_dict().items() if ".mlp." not in k or not _in_moe(k, spec)}
    layers = decoder_layers(model)
    prefix = _layers_prefix(model)
    for i in spec.layers:
        block = layers[i].mlp
        p = f"{prefix}{i}.mlp."
        sd[p + "gate.weight"] = block.router.weight.detach()
        sd[p + "experts.gate_up_proj"] = torch.stack(
            [torch.cat([e.gate_proj.weight, e.up_proj.weight], dim=0) for e in block.experts]
        ).detach()
        sd[p + "experts.down_proj"] = torch.stack([e.down_proj.weight for e in block.experts]).detach()
    return sd


def from_hf_state(
    hf_sd: dict[str, torch.Tensor], spec: UpcycleSpec, prefix: str, source: str | os.PathLike | None = None
) -> dict[str, torch.Tensor]:
    """The inverse of `to_hf_state` (Qwen2-MoE's shared experts, which add exactly 0, are dropped).
    `source` names the folder in the one-line errors about weights that do not match its upcycle.json."""
    _check_shared_experts_add_nothing(hf_sd, Path(source) if source is not None else None)
    out = {k: v for k, v in hf_sd.items() if ".mlp.shared_expert" not in k}
    for i in spec.layers:
        p = f"{prefix}{i}.mlp."
        _check_stacked(out, p, i, spec, Path(source) / UPCYCLE_FILE if source is not None else Path(UPCYCLE_FILE))
        out[p + "router.weight"] = out.pop(p + "gate.weight")
        gate_up, down = out.pop(p + "experts.gate_up_proj"), out.pop(p + "experts.down_proj")
        width = gate_up.shape[1] // 2
        for e in range(spec.experts):
            out[f"{p}experts.{e}.gate_proj.weight"] = gate_up[e, :width]
            out[f"{p}experts.{e}.up_proj.weight"] = gate_up[e, width:]
            out[f"{p}experts.{e}.down_proj.weight"] = down[e]
    return out


def _check_shared_experts_add_nothing(hf_sd: dict[str, torch.Tensor], source: Path | None) -> None:
    """A shared expert with an all-zero projection (or none, at zero width) adds exactly 0 and can be dropped;
    one that adds something cannot: deltatune's MoE has no shared expert, so dropping it would change outputs."""
    experts: dict[str, list[torch.Tensor]] = {}
    for k, v in hf_sd.items():
        if m := re.match(r"(.*\.mlp\.shared_expert)\.(gate|up|down)_proj\.weight$", k):
            experts.setdefault(m.group(1), []).append(v)
    for name, projections in sorted(experts.items()):
        if all(p.any() for p in projections):
            weights = source / "model.safetensors" if source is not None else Path("model.safetensors")
            raise UserError(
                "a Qwen2-MoE shared expert that adds to the output (deltatune's MoE has none and exports it as "
                "zeros); without upcycle.json beside it the folder loads through transformers' Qwen2-MoE modules, "
                "shared expert included",
                file=str(weights),
                field=name,
            )


def _check_stacked(sd: dict[str, torch.Tensor], p: str, layer: int, spec: UpcycleSpec, meta_file: Path) -> None:
    """A layer upcycle.json calls MoE has the transformers MoE tensors, with spec.experts experts: else the
    unstacking would fail with an IndexError (or silently keep too few experts)."""
    names = ("gate.weight", "experts.gate_up_proj", "experts.down_proj")
    absent = [p + n for n in names if p + n not in sd]
    if absent:
        raise UserError(
            f"layer {layer} is MoE here, but the weights have no '{absent[0]}'",
            file=str(meta_file),
            field="spec.layers",
        )
    held = {int(sd[p + n].shape[0]) for n in names}
    if held != {spec.experts}:
        raise UserError(
            f"{spec.experts} experts here, but the weights hold {min(held)} in layer {layer}",
            file=str(meta_file),
            field="spec.experts",
        )


def _layers_prefix(model: nn.Module) -> str:
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name + "."
    raise UserError("cannot locate the decoder layers", field="model")


def _in_moe(key: str, spec: UpcycleSpec) -> bool:
    return any(f"layers.{i}.mlp." in key for i in spec.layers)


def save_upcycled(model: nn.Module, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write an upcycled model atomically (format chosen by `export_format`); returns the folder."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    spec = spec_of(model)
    if spec is None:
        raise UserError("the model has no MoE layers; save it as a plain model", field="model")
    fmt, why = export_format(model, spec)
    dtype = next(model.parameters()).dtype
    with atomic_dir(out_dir) as tmp:
        if fmt == "deltatune":
            model.config.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:  # the dense model's (see _restore_...)
                model.generation_config.save_pretrained(tmp)
            tied = getattr(model.config, "tie_word_embeddings", False)
            sd = {
                k: v.detach().contiguous()
                for k, v in model.state_dict().items()
                if not (tied and k.endswith("lm_head.weight"))
            }
            save_file(sd, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        else:
            with quiet_zero_width():
                hf = AutoModelForCausalLM.from_config(hf_config(model, spec, fmt), dtype=dtype)
            missing, unexpected = hf.load_state_dict(to_hf_state(model, spec), strict=False)
            missing = [k for k in missing if not k.endswith("lm_head.weight") and ".shared_expert" not in k]
            if missing or unexpected:
                raise RuntimeError(f"{fmt} export mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}")
            with torch.no_grad():
                for name, p in hf.named_parameters():
                    if ".shared_expert" in name:
                        p.zero_()  # see SHARED_EXPERT_WIDTH: adds exactly 0, and every gradient is 0
            hf.tie_weights()
            if getattr(model, "generation_config", None) is not None:  # else regenerated from the MoE config.json
                hf.generation_config = copy.deepcopy(model.generation_config)
            hf.save_pretrained(tmp, safe_serialization=True)
        meta = {
            "format": fmt,
            "why": why,
            "spec": spec.to_dict(),
            "aux_loss_weight": trained_aux_weight(model),
            "dense_config": model.config.to_dict(),
        }
        (tmp / UPCYCLE_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


@contextmanager
def quiet_zero_width() -> Iterator[None]:
    """Qwen2-MoE's zero-width shared expert makes torch warn that initialising it is a no-op."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        yield


FORMATS = ("mixtral", "qwen2_moe", "deltatune")

# upcycle.json's spec fields: (accepts the JSON value, what it must be)
_SPEC_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "experts": (lambda v: _is_int(v), "an integer"),
    "layers": (lambda v: isinstance(v, list) and all(_is_int(i) for i in v), "a list of 0-based layer indices"),
    "router": (lambda v: isinstance(v, str), f"one of {', '.join(ROUTERS)}"),
    "k": (lambda v: _is_int(v), "an integer"),
    "capacity": (lambda v: v is None or _is_int(v) or isinstance(v, float), "a number or null"),
    "normalize": (lambda v: isinstance(v, bool), "true or false"),
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _bare_message(exc: UserError) -> str:
    """A UserError's message without its 'file: field ...: ' prefix, to name another file and field."""
    text = str(exc)
    prefix = f"field '{exc.field}': " if exc.field is not None and exc.file is None else ""
    return text[len(prefix) :] if prefix and text.startswith(prefix) else text


def read_meta(path: str | os.PathLike) -> dict:
    """upcycle.json, checked: a damaged or hand-edited file is a one-line error naming it and the field, not a
    TypeError or IndexError deep in the load."""
    file = Path(path) / UPCYCLE_FILE
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"not a valid upcycle description: {exc}", file=str(file)) from None
    if not isinstance(meta, dict):
        raise UserError("not a valid upcycle description: must be a JSON object", file=str(file))
    if meta.get("format") not in FORMATS:
        raise UserError(
            f"{meta.get('format')!r} is not a format; expected one of {', '.join(FORMATS)}",
            file=str(file),
            field="format",
        )
    dense = meta.get("dense_config")
    if not isinstance(dense, dict) or not isinstance(dense.get("model_type"), str):
        raise UserError(
            "must be the dense model's config: an object with its model_type", file=str(file), field="dense_config"
        )
    meta["spec"] = _read_spec(meta.get("spec"), file)
    weight = meta.get("aux_loss_weight")
    if weight is not None and not (_is_number(weight) and weight >= 0):
        raise UserError(f"must be a number >= 0 or absent, got {weight!r}", file=str(file), field="aux_loss_weight")
    return meta


def _read_spec(raw: Any, file: Path) -> UpcycleSpec:
    """The spec of upcycle.json with the types UpcycleSpec needs, and the values `validate` accepts."""
    if not isinstance(raw, dict):
        raise UserError(f"must be an object of {', '.join(_SPEC_FIELDS)}", file=str(file), field="spec")
    for key, (ok, what) in _SPEC_FIELDS.items():
        if key not in raw:
            raise UserError("is missing", file=str(file), field=f"spec.{key}")
        if not ok(raw[key]):
            raise UserError(f"must be {what}, got {raw[key]!r}", file=str(file), field=f"spec.{key}")
    spec = UpcycleSpec(**{k: raw[k] for k in _SPEC_FIELDS})
    try:
        validate(spec)
    except UserError as exc:
        raise UserError(_bare_message(exc), file=str(file), field=f"spec.{exc.field}") from None
    return spec


def _dense_config(meta: dict, path: Path):
    """The dense model's transformers config from upcycle.json's dense_config (one-line error if it is not one)."""
    from transformers import AutoConfig

    cfg = dict(meta["dense_config"])
    try:
        return AutoConfig.for_model(**cfg)
    except Exception as exc:  # user JSON: TypeError, ValueError, huggingface_hub's validation error, ...
        raise UserError(
            f"not a config transformers can build: {' '.join(str(exc).split())[:300]}",
            file=str(path / UPCYCLE_FILE),
            field="dense_config",
        ) from None


def dense_skeleton(meta: dict, dtype: torch.dtype, path: str | os.PathLike = ".") -> nn.Module:
    """The dense model upcycle.json describes, at random (the weights are loaded over it)."""
    from transformers import AutoModelForCausalLM

    config = _dense_config(meta, Path(path))
    try:
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError, ZeroDivisionError) as exc:
        raise UserError(
            f"cannot build the model it describes: {_first_line(exc)}",
            file=str(Path(path) / UPCYCLE_FILE),
            field="dense_config",
        ) from None


def _upcycle_structure(model: nn.Module, spec: UpcycleSpec, path: Path) -> None:
    """The MoE blocks upcycle.json's spec describes, over the dense skeleton; a spec that does not fit the
    dense config (a layer it lacks, an MoE source) names upcycle.json and the field."""
    try:
        upcycle(model, spec, copy_weights=False)
    except UserError as exc:
        field = f"spec.{exc.field}" if exc.field in _SPEC_FIELDS else "dense_config"
        raise UserError(_bare_message(exc), file=str(path / UPCYCLE_FILE), field=field) from None


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """deltatune's weights file, with the dense load's one-line errors for a missing or damaged file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise UserError("is missing (the upcycled weights)", file=str(file), field="model")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise UserError(
            f"the weights file is damaged or cut short ({_first_line(exc)})", file=str(file), field="model"
        ) from None


def _read_transformers_weights(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A Mixtral / Qwen2-MoE folder's state dict through from_pretrained, with models.load_model's translation
    of a missing, damaged or incomplete weights file into one line."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from deltatune.models import check_loaded_weights, config_error

    weights = path / "model.safetensors"
    if not weights.is_file() and not (path / "model.safetensors.index.json").is_file():
        raise UserError("is missing (the upcycled weights)", file=str(weights), field="model")
    try:
        with quiet_zero_width():
            hf, loading = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the upcycled model: {_first_line(exc)}", file=str(path), field="model") from None
    except SafetensorError as exc:
        raise UserError(
            f"the weights file is damaged or cut short ({_first_line(exc)})", file=str(weights), field="model"
        ) from None
    except Exception as exc:  # a config.json that does not fit the weights, or breaks its class's rules
        mismatch = config_error(exc, path)
        if mismatch is None:
            raise
        raise mismatch from None
    check_loaded_weights(str(weights), loading)
    return hf.state_dict()


def _load_weights(model: nn.Module, sd: dict[str, torch.Tensor], weights: Path) -> None:
    """Load `sd` into the upcycled skeleton; tensors the skeleton lacks or shapes other than upcycle.json's
    dense config are one-line errors naming the weights file (torch would raise a many-line RuntimeError)."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    own = model.state_dict()
    for key, tensor in sd.items():
        if key in own and own[key].shape != tensor.shape:
            raise UserError(
                f"shape {tuple(tensor.shape)}, but upcycle.json's dense_config needs {tuple(own[key].shape)}",
                file=str(weights),
                field=key,
            )
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise UserError(
            f"weights do not match upcycle.json: missing {missing[:3]}, unexpected {unexpected[:3]}", file=str(weights)
        )
    if tied:
        model.tie_weights()


def load_upcycled(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None
) -> nn.Module:
    """Any upcycled folder (Mixtral, Qwen2-MoE or deltatune format) as deltatune modules, in eval mode."""
    path = Path(path)
    meta = read_meta(path)
    spec: UpcycleSpec = meta["spec"]
    model = dense_skeleton(meta, dtype, path)
    _upcycle_structure(model, spec, path)
    if meta["format"] == "deltatune":
        weights = path / WEIGHTS_FILE
        sd = _read_safetensors(weights)
        _check_expert_keys(sd, spec, _layers_prefix(model), path)
    else:
        weights = path / "model.safetensors"
        _check_routing_config(path, spec, meta["format"])
        sd = from_hf_state(_read_transformers_weights(path, dtype), spec, _layers_prefix(model), path)
    _check_moe_layers(sd, spec, _layers_prefix(model), path)
    _load_weights(model, sd, weights)
    if attn_implementation is not None:  # None: the model's own choice (SDPA where it has it)
        model.set_attn_implementation(attn_implementation)
    _restore_generation_config(model, path)
    _restore_aux_weight(model, meta, path)
    # the skeleton came from upcycle.json's dense_config, which names the dense source: an adapter saved on this
    # model recorded that as its base, and `merge` silently built the dense model (as from_pretrained names it)
    model.config._name_or_path = model.name_or_path = str(path)
    from deltatune.models import cast_weights

    return cast_weights(model, dtype).eval()  # RoPE's inv_freq stays float32, as from_pretrained keeps it


def _check_routing_config(path: Path, spec: UpcycleSpec, fmt: str) -> None:
    """config.json routes as upcycle.json does: transformers builds the model from the first, deltatune from the
    second, and a hand-edited `num_experts_per_tok` or `norm_topk_prob` loaded silently as two different models
    (logits 0.1-0.5 apart). The keys that shape the weights (the expert count, the dense layers) need no check
    here: the weights' own checks name the file that disagrees with them."""
    file = path / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # transformers' load names what is wrong with it
    if not isinstance(config, dict):
        return
    expected: dict[str, Any] = {"num_experts_per_tok": spec.k}
    if fmt != "mixtral":
        expected["norm_topk_prob"] = spec.normalize
    for key, value in expected.items():
        if key in config and config[key] != value:
            raise UserError(
                f"is {config[key]!r} where upcycle.json's routing gives {value!r}: transformers and deltatune "
                "would load two different models",
                file=str(file),
                field=key,
            )


def _check_moe_layers(sd: dict[str, torch.Tensor], spec: UpcycleSpec, prefix: str, path: Path) -> None:
    """No layer that upcycle.json calls dense holds a router or experts in the weights (else the load lists
    every missing dense and unexpected expert tensor instead of naming the field that is wrong)."""
    pattern = re.compile(rf"{re.escape(prefix)}(\d+)\.mlp\.(experts|router|gate)\b")
    extra = sorted({int(m.group(1)) for k in sd if (m := pattern.match(k))} - set(spec.layers))
    if extra:
        raise UserError(
            f"{spec.layers} are the MoE layers here, but the weights hold experts in layer {extra[0]} too",
            file=str(path / UPCYCLE_FILE),
            field="spec.layers",
        )


def _check_expert_keys(sd: dict[str, torch.Tensor], spec: UpcycleSpec, prefix: str, path: Path) -> None:
    """deltatune's format: each MoE layer's weights hold spec.experts experts (else a load would list every
    missing or unexpected expert tensor instead of saying which count is wrong)."""
    for i in spec.layers:
        pattern = re.compile(rf"{re.escape(prefix)}{i}\.mlp\.experts\.(\d+)\.")
        held = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
        if held and len(held) != spec.experts:
            raise UserError(
                f"{spec.experts} experts here, but {WEIGHTS_FILE} holds {len(held)} in layer {i}",
                file=str(path / UPCYCLE_FILE),
                field="spec.experts",
            )


def _restore_generation_config(model: nn.Module, path: Path) -> None:
    """The dense model's generation_config (extra eos ids, sampling defaults), saved beside the weights: a
    model built from its config alone would have one regenerated from config.json, which lacks them."""
    from transformers import GenerationConfig

    if not (path / "generation_config.json").is_file():
        return
    try:
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise UserError(
            f"not a valid generation config: {_first_line(exc)}", file=str(path / "generation_config.json")
        ) from None


def meta_upcycled(path: str | os.PathLike, dtype: torch.dtype) -> tuple[nn.Module, dict]:
    """An upcycled folder's structure on the meta device (no weights) for `deltatune plan`, with its
    parameter counts (total, active per token; see convert.count_parameters) and spec."""
    from deltatune.upcycle.convert import count_parameters

    meta = read_meta(path)
    with torch.device("meta"):
        model = dense_skeleton(meta, dtype, path)
        _upcycle_structure(model, meta["spec"], Path(path))
    return model, {**count_parameters(model), "spec": meta["spec"].to_dict(), "format": meta["format"]}
