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

import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from deltatune.errors import UserError
from deltatune.fileio import atomic_dir
from deltatune.upcycle.convert import UpcycleSpec, decoder_layers, spec_of, upcycle

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


def hf_config(model: nn.Module, spec: UpcycleSpec, fmt: str):
    from transformers import MixtralConfig, Qwen2MoeConfig

    cfg = model.config
    common = _common_config(cfg)
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
        shared_expert_intermediate_size=0,
        norm_topk_prob=spec.normalize,
        mlp_only_layers=dense_layers,
        decoder_sparse_step=1,
        qkv_bias=False,
        use_sliding_window=False,
    )


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


def from_hf_state(hf_sd: dict[str, torch.Tensor], spec: UpcycleSpec, prefix: str) -> dict[str, torch.Tensor]:
    """The inverse of `to_hf_state` (shared-expert tensors of Qwen2-MoE, all of zero width, are dropped)."""
    out = {}
    for k, v in hf_sd.items():
        if ".mlp.shared_expert" in k:
            continue
        out[k] = v
    for i in spec.layers:
        p = f"{prefix}{i}.mlp."
        out[p + "router.weight"] = out.pop(p + "gate.weight")
        gate_up, down = out.pop(p + "experts.gate_up_proj"), out.pop(p + "experts.down_proj")
        width = gate_up.shape[1] // 2
        for e in range(spec.experts):
            out[f"{p}experts.{e}.gate_proj.weight"] = gate_up[e, :width]
            out[f"{p}experts.{e}.up_proj.weight"] = gate_up[e, width:]
            out[f"{p}experts.{e}.down_proj.weight"] = down[e]
    return out


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
                        p.zero_()  # zero width (shared expert) and a gate in front of it: adds exactly 0
            hf.tie_weights()
            hf.save_pretrained(tmp, safe_serialization=True)
        meta = {"format": fmt, "why": why, "spec": spec.to_dict(), "dense_config": model.config.to_dict()}
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


def read_meta(path: str | os.PathLike) -> dict:
    file = Path(path) / UPCYCLE_FILE
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
        meta["spec"] = UpcycleSpec.from_dict(meta["spec"])
        _ = meta["format"], meta["dense_config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"not a valid upcycle description: {exc}", file=str(file)) from None
    return meta


def dense_skeleton(meta: dict, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(meta["dense_config"])
    config = AutoConfig.for_model(**cfg)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_upcycled(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None
) -> nn.Module:
    """Any upcycled folder (Mixtral, Qwen2-MoE or deltatune format) as deltatune modules, in eval mode."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = Path(path)
    meta = read_meta(path)
    spec: UpcycleSpec = meta["spec"]
    model = dense_skeleton(meta, dtype)
    upcycle(model, spec, copy_weights=False)
    if meta["format"] == "deltatune":
        if not (path / WEIGHTS_FILE).is_file():
            raise UserError(f"{path / WEIGHTS_FILE} is missing", field="model")
        sd = load_file(str(path / WEIGHTS_FILE))
    else:
        with quiet_zero_width():
            hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        sd = from_hf_state(hf.state_dict(), spec, _layers_prefix(model))
        del hf
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise UserError(
            f"weights do not match upcycle.json: missing {missing[:3]}, unexpected {unexpected[:3]}", file=str(path)
        )
    if tied:
        model.tie_weights()
    if attn_implementation is not None:  # None: the model's own choice (SDPA where it has it)
        model.set_attn_implementation(attn_implementation)
    from deltatune.models import cast_weights

    return cast_weights(model, dtype).eval()  # RoPE's inv_freq stays float32, as from_pretrained keeps it


def meta_upcycled(path: str | os.PathLike, dtype: torch.dtype) -> tuple[nn.Module, dict]:
    """An upcycled folder's structure on the meta device (no weights) for `deltatune plan`, with its
    parameter counts (total, active per token; see convert.count_parameters) and spec."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from deltatune.upcycle.convert import count_parameters

    meta = read_meta(path)
    config = AutoConfig.for_model(**dict(meta["dense_config"]))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        upcycle(model, meta["spec"], copy_weights=False)
    return model, {**count_parameters(model), "spec": meta["spec"].to_dict(), "format": meta["format"]}
