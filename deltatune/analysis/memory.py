"""What a finetune costs: parameters (total, trainable, by layer type and by method) and memory
(weights, gradients, optimizer state, activations, adapter file), measured on a model or planned
from a config alone on the meta device, so a 70B plan needs no download and no RAM.

Memory model (bytes), stated so it can be checked:
- weights: every parameter at its own dtype (adapters may be fp32 on a bf16 base); an NF4 (QLoRA) base
  weight at its stored size, half a byte per weight plus its scales;
- gradients: every trainable parameter at its dtype. A plan holds them as `deltatune train` does: what
  trains in fp32 (master weights), and the whole model in fp32 when the run writes one (full finetuning),
  whatever the frozen weights' dtype;
- optimizer: AdamW keeps two states per trainable parameter, counted as fp32 (8 bytes/parameter);
- adapter file: the trained tensors at their dtype (what `save_adapter` writes, headers aside);
- activations: ROUGH. Per decoder layer, the tensors autograd keeps for backward in a Llama-style
  block: b*s*(7h + 3kv + 4i) elements (norm inputs/outputs, q, k, v, rotated q and k, attention
  output, gate, up, act(gate), gate*up), plus b*heads*s*s if attention materialises its
  probabilities (eager/"math" attention; FlashAttention and memory-efficient SDPA don't), plus, per
  adapted linear, b*s*r for LoRA's intermediate and b*s*d_in when LoRA dropout > 0. With gradient
  checkpointing only each layer's input (b*s*h) is kept, plus one layer's activations during its
  recomputation. Plus the loss head as `deltatune train` runs it (chunked, train/loss.py): min(b*s,
  loss_chunk)*V logits in the compute dtype and a float32 copy (one buffer in fp32), and 2*b*s*h for the loss
  positions' hidden states and their gradient (a loop that materialises all logits needs b*s*V twice).
  Element size = the compute dtype's.
- fits: total + 1 GiB for the CUDA context and workspace <= the GPU's memory.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.errors import UserError

GiB = 1024**3
CUDA_OVERHEAD = 1 * GiB
ADAMW_STATE_BYTES = 8  # two fp32 moments per trainable parameter

# Offline configs for well-known sizes (values from the models' published config.json files).
_LLAMA = dict(model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=4096)
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        _LLAMA,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "smollm2-360m": dict(
        _LLAMA,
        hidden_size=960,
        intermediate_size=2560,
        num_hidden_layers=32,
        num_attention_heads=15,
        num_key_value_heads=5,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "smollm2-1.7b": dict(
        _LLAMA,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "llama-7b": dict(
        _LLAMA,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "llama-13b": dict(
        _LLAMA,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "llama-70b": dict(
        _LLAMA,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "llama3-8b": dict(
        _LLAMA,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    "llama3-70b": dict(
        _LLAMA,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    "mistral-7b": dict(
        _LLAMA,
        model_type="mistral",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "qwen2.5-0.5b": dict(
        _LLAMA,
        model_type="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        _LLAMA,
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
}
BUILTIN_CONFIGS["llama2-7b"] = BUILTIN_CONFIGS["llama-7b"]
BUILTIN_CONFIGS["llama2-13b"] = BUILTIN_CONFIGS["llama-13b"]
BUILTIN_CONFIGS["llama2-70b"] = BUILTIN_CONFIGS["llama-70b"]


# --- parameters ----------------------------------------------------------------------------------
def layer_type(model: nn.Module, name: str) -> str:
    """Group a parameter for budget matching: "bias", "norm", the adapted linear's name ("q_proj",
    also for its LoRA/DoRA/... tensors), else the owning module's name ("embed_tokens", "lm_head")."""
    from deltatune.methods.base import DeltaLinear

    module_name, _, leaf = name.rpartition(".")
    if leaf == "bias":
        return "bias"
    parts = module_name.split(".") if module_name else []
    owner = model.get_submodule(module_name) if module_name else model
    for k in range(len(parts), 0, -1):  # the nearest wrapped linear, if any, names the group
        if isinstance(model.get_submodule(".".join(parts[:k])), DeltaLinear):
            return parts[k - 1]
    if "norm" in type(owner).__name__.lower() or "norm" in (parts[-1] if parts else "").lower():
        return "norm"
    named = [p for p in parts if not p.isdigit()]
    return named[-1] if named else leaf


@dataclass
class ParamReport:
    total: int
    trainable: int
    by_type: dict[str, list[int]]  # layer type -> [total, trainable]
    by_method: dict[str, int]
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    adapter_bytes: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "trainable": self.trainable,
            "percent": self.percent,
            "by_type": self.by_type,
            "by_method": self.by_method,
            "weight_bytes": self.weight_bytes,
            "gradient_bytes": self.gradient_bytes,
            "optimizer_bytes": self.optimizer_bytes,
            "adapter_bytes": self.adapter_bytes,
        }


def parameter_report(target) -> ParamReport:
    """Count an `AdaptedModel` (per method too) or a plain model (trainable = requires_grad)."""
    from deltatune.methods.apply import AdaptedModel
    from deltatune.methods.nf4 import NF4Linear

    saved_buffers: list[torch.Tensor] = []  # frozen tensors the adapter file holds too (VeRA's shared matrices)
    if isinstance(target, AdaptedModel):
        model = target.model
        by_method = {m.name: sum(p.numel() for _, p in m.trainable_parameters(model)) for m in target.methods}
        trainable_ids = {id(p) for _, p in target.trainable_parameters()}
        parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        saved_buffers = [t for name, t in target.adapter_state_dict().items() if name not in parameters]
    else:
        model, by_method = target, {}
        trainable_ids = {id(p) for p in model.parameters() if p.requires_grad}
    total = trainable = weight_bytes = trainable_bytes = 0
    by_type: dict[str, list[int]] = {}
    for name, p in model.named_parameters():  # tied weights appear once
        n = p.numel()
        kind = by_type.setdefault(layer_type(model, name), [0, 0])
        total += n
        kind[0] += n
        weight_bytes += n * p.element_size()
        if id(p) in trainable_ids:
            trainable += n
            kind[1] += n
            trainable_bytes += n * p.element_size()
    for name, module in model.named_modules():  # a QLoRA base keeps its weight in buffers, not parameters
        if isinstance(module, NF4Linear):
            n = module.out_features * module.in_features
            kind = by_type.setdefault(layer_type(model, f"{name}.weight"), [0, 0])
            total += n
            kind[0] += n
            weight_bytes += module.weight_nbytes()  # 4-bit codes and their scales
    saved_bytes = sum(t.numel() * t.element_size() for t in saved_buffers)
    weight_bytes += saved_bytes
    return ParamReport(
        total=total,
        trainable=trainable,
        by_type=by_type,
        by_method=by_method,
        weight_bytes=weight_bytes,
        gradient_bytes=trainable_bytes,
        optimizer_bytes=trainable * ADAMW_STATE_BYTES,
        adapter_bytes=trainable_bytes + saved_bytes,
    )


def adapter_file_size(adapter_dir: str | os.PathLike) -> int:
    """Bytes on disk of an adapter folder (all its files)."""
    return sum(f.stat().st_size for f in Path(adapter_dir).iterdir() if f.is_file())


# --- activations ---------------------------------------------------------------------------------
def mlp_width(config) -> int:
    """The MLP's inner width under the names configs give it (GPT-2's `n_inner`, Falcon's `ffn_hidden_size`, which
    may be unset for their 4 x hidden default)."""
    for name in ("intermediate_size", "n_inner", "ffn_hidden_size"):
        width = getattr(config, name, None)
        if width:
            return int(width)
    return 4 * int(config.hidden_size)


def activation_bytes(
    config,
    *,
    batch_size: int,
    seq_len: int,
    dtype: torch.dtype,
    gradient_checkpointing: bool,
    adapter_numel_per_token: int = 0,
    materialised_attention: bool = False,
    loss_chunk: int = 1024,
) -> int:
    """The rough formula in this module's docstring. `adapter_numel_per_token`: what the adapted layers keep
    for backward per token, summed over layers (`DeltaLinear.activation_numel_per_token`)."""
    e = torch.empty((), dtype=dtype).element_size()
    b, s = batch_size, seq_len
    h, i, L = config.hidden_size, mlp_width(config), config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    kv_dim = kv * getattr(config, "head_dim", None) if getattr(config, "head_dim", None) else kv * h // heads
    per_layer = b * s * (7 * h + 3 * kv_dim + 4 * i) * e
    if materialised_attention:
        per_layer += b * heads * s * s * e
    adapters = b * s * adapter_numel_per_token * e
    # deltatune's loss head (train/loss.py): one chunk of logits at a time, in the compute dtype and a float32 copy
    # (one buffer when that is float32), and the loss positions' hidden states with their gradient, computed in
    # the forward; at most every position carries loss. Full logits (b*s*V twice) were 11.7 GiB of a 34 GiB plan
    # for Llama-3-8B at 8 x 2048 that train holds in 0.7 GiB.
    logits = min(b * s, loss_chunk) * config.vocab_size * (e + (4 if e < 4 else 0)) + 2 * b * s * h * e
    if gradient_checkpointing:
        return L * b * s * h * e + per_layer + adapters // max(L, 1) + logits
    return L * per_layer + adapters + logits


# --- planning ------------------------------------------------------------------------------------
@dataclass
class PlanReport:
    model: str
    architecture: str
    config: Any
    dtype: torch.dtype
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    params: ParamReport
    activation_bytes: int
    methods: list[str] = field(default_factory=list)
    moe: dict | None = None  # upcycled models: total / active-per-token parameters, spec (deltatune/upcycle)

    @property
    def total_bytes(self) -> int:
        p = self.params
        return p.weight_bytes + p.gradient_bytes + p.optimizer_bytes + self.activation_bytes

    def fits(self, gpu_bytes: int) -> bool:
        return self.total_bytes + CUDA_OVERHEAD <= gpu_bytes

    def table(self, gpu_bytes: int | None = None) -> str:
        p, c = self.params, self.config
        lines = [
            f"model: {self.model} ({self.architecture}, {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
            f"vocab {c.vocab_size})",
            f"method: {' + '.join(self.methods)}; dtype {str(self.dtype).replace('torch.', '')}; batch "
            f"{self.batch_size} x {self.seq_len} tokens; gradient checkpointing "
            f"{'on' if self.gradient_checkpointing else 'off'}",
            f"parameters: total {p.total:,}  trainable {p.trainable:,} ({p.percent:.3f}%)",
            "trainable by layer type:",
        ]
        for kind, (tot, tr) in sorted(p.by_type.items(), key=lambda kv: -kv[1][1]):
            if tr:
                lines.append(f"  {kind:<16} {tr:>16,}  of {tot:>16,}")
        if self.moe:
            m, sp = self.moe, self.moe["spec"]
            route = f"top-{sp['k']}" if sp["router"] == "topk" else f"expert choice C={sp['capacity']}"
            lines.append(
                f"mixture of experts: {sp['experts']} experts ({route}) in layers {sp['layers']}; "
                f"parameters {m['total']:,}, active per token {m['active_per_token']:,}, "
                f"routers {m['router']:,}"
            )
        if len(p.by_method) > 1:
            lines.append("trainable by method: " + ", ".join(f"{k} {v:,}" for k, v in p.by_method.items()))
        rows = [
            ("weights", p.weight_bytes),
            ("gradients", p.gradient_bytes),
            ("optimizer (AdamW, 2 x fp32)", p.optimizer_bytes),
            ("activations (rough)", self.activation_bytes),
            ("total", self.total_bytes),
        ]
        lines.append("memory:")
        lines += [f"  {k:<28} {format_bytes(v):>12}" for k, v in rows]
        lines.append(f"  {'adapter file':<28} {format_bytes(p.adapter_bytes):>12}")
        if gpu_bytes is not None:
            need = self.total_bytes + CUDA_OVERHEAD
            verdict = "fits" if self.fits(gpu_bytes) else "does NOT fit"
            lines.append(
                f"{verdict} in {format_bytes(gpu_bytes)} (needs about {format_bytes(need)} incl. 1 GiB CUDA context)"
            )
        return "\n".join(lines)


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def parse_bytes(text: str) -> int:
    """'24GiB', '24 GB', '80G', '512MiB', '1e9' -> bytes (GB and G are read as GiB, as GPU sizes are)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?B)?\s*", str(text), flags=re.IGNORECASE)
    try:
        value = float(m.group(1)) if m else math.nan  # '1.2.3', '.', 'e' match the pattern but are no number
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"cannot read memory size '{text}'; write e.g. 24GiB or 80GB", field="gpu-memory")
    unit = m.group(2).upper()
    size = int(value * {"": 1, "K": 1024, "M": 1024**2, "G": GiB, "T": 1024**4}[unit])
    if size < 1:
        raise UserError(f"memory size '{text}' must be more than 0 bytes", field="gpu-memory")
    return size


def resolve_config(model: Any):
    """(display name, transformers config) from a config, a built-in name, the default model, a folder
    or (with a network) a hub id. Never loads weights."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return type(model).__name__, model
    name = str(model) if model is not None else "default"
    key = name.lower()
    from deltatune.models import DEFAULT_MODEL, DEFAULT_MODEL_ALIASES, cache_dir

    if model is None or key in DEFAULT_MODEL_ALIASES:
        folder = cache_dir() / "models" / DEFAULT_MODEL
        if (folder / "config.json").exists():
            return DEFAULT_MODEL, AutoConfig.from_pretrained(str(folder))
        key = "smollm2-135m"
    if key in BUILTIN_CONFIGS:
        values = dict(BUILTIN_CONFIGS[key])
        return name, AutoConfig.for_model(values.pop("model_type"), **values)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"{path}: folder has no config.json", field="model")
        return name, _folder_config(path)
    if path.is_file() and path.name == "config.json":
        return name, _folder_config(path.parent)
    offline_hint = f"use a model folder or one of: {', '.join(sorted(BUILTIN_CONFIGS))}"
    try:  # a hub id: the local cache first, the network only where one answers (no slow retries)
        return name, AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        pass
    from huggingface_hub import constants

    from deltatune.models import hub_reachable

    if constants.HF_HUB_OFFLINE or not hub_reachable(constants.ENDPOINT):
        raise UserError(
            f"'{name}' is not a folder, a built-in size, or a cached hub id, and the hub is not "
            f"reachable; {offline_hint}",
            field="model",
        )
    try:
        return name, AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot read a config for '{name}' ({str(exc).splitlines()[0][:120]}); {offline_hint}", field="model"
        ) from exc


def _folder_config(folder: Path):
    """The transformers config of a model folder; a config.json it cannot read is one line naming the file."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except Exception as exc:  # bad JSON (OSError), an unknown model_type (ValueError), a wrong field's type, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"cannot read it as a model config ({first})", file=str(folder / "config.json")) from None


def meta_model(config, dtype: torch.dtype) -> nn.Module:
    """The model's structure with no storage: parameters on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def plan_finetune(
    model_name_or_config: Any,
    method_specs: list,
    *,
    dtype: str | torch.dtype = "bf16",
    batch_size: int = 4,
    seq_len: int = 256,
    gradient_checkpointing: bool = False,
    materialised_attention: bool = False,
) -> PlanReport:
    """Plan a finetune from the config alone (meta device): parameters, memory, and whether it fits."""
    from deltatune.methods.apply import apply_methods
    from deltatune.methods.base import DeltaLinear
    from deltatune.models import parse_dtype

    dtype = parse_dtype(dtype)
    for field_name, value in (("batch-size", batch_size), ("seq-len", seq_len)):  # the one that is wrong, named
        if value < 1:
            raise UserError(f"must be at least 1, got {value}", field=field_name)
    name, config = resolve_config(model_name_or_config)
    moe = None
    if isinstance(model_name_or_config, (str, os.PathLike)) and (Path(model_name_or_config) / "upcycle.json").is_file():
        from deltatune.upcycle.io import meta_upcycled  # built as deltatune trains it: experts as nn.Linear

        model, moe = meta_upcycled(model_name_or_config, dtype)
        config = model.config
    else:
        model = meta_model(config, dtype)
    adapted = apply_methods(model, method_specs)
    # as `deltatune train` holds them (train/loop.py): whatever trains as fp32 master weights, and a run whose
    # output is a whole model (full finetuning) from fp32 weights throughout; `dtype` is the frozen weights'
    with torch.no_grad():
        if any(m.writes_full_model for m in adapted.methods):
            model.float()
        for _, p in adapted.trainable_parameters():
            p.data = p.data.float()
    params = parameter_report(adapted)
    per_token = sum(m.activation_numel_per_token() for m in model.modules() if isinstance(m, DeltaLinear))
    act = activation_bytes(
        config,
        batch_size=batch_size,
        seq_len=seq_len,
        dtype=dtype,
        gradient_checkpointing=gradient_checkpointing,
        adapter_numel_per_token=per_token,
        materialised_attention=materialised_attention,
    )
    if moe and not gradient_checkpointing:  # rough: each routed copy of a token keeps the MLP's saved inputs
        per_token = moe["spec"]["k"] if moe["spec"]["router"] == "topk" else (moe["spec"]["capacity"] or 1.0)
        mlp_saved = batch_size * seq_len * (3 * mlp_width(config) + config.hidden_size) * dtype.itemsize
        act += int(moe["moe_layers"] * (per_token - 1) * mlp_saved)
    return PlanReport(
        model=name,
        architecture=type(model).__name__,
        config=config,
        dtype=dtype,
        batch_size=batch_size,
        seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing,
        params=params,
        activation_bytes=act,
        methods=[m.name for m in adapted.methods],
        moe=moe,
    )


def report_json(report: PlanReport) -> str:
    return json.dumps(
        {
            "model": report.model,
            "params": report.params.to_dict(),
            "moe": report.moe,
            "activation_bytes": report.activation_bytes,
            "total_bytes": report.total_bytes,
        },
        indent=2,
    )
