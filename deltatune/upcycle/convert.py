"""Upcycling surgery: replace the MLP of chosen decoder layers by E copies of it plus a router.

Everything else (attention, norms, embeddings, the other MLPs) is kept as it is. The router is a
bias-free linear d_model -> E with weights ~ N(0, 0.02^2), the released configs' initialisation.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass

import torch
from torch import nn

from deltatune.errors import UserError
from deltatune.upcycle.moe import ROUTERS, MoEBlock, moe_blocks

ROUTER_STD = 0.02


@dataclass
class UpcycleSpec:
    """What `deltatune upcycle` did; saved as upcycle.json beside the weights."""

    experts: int = 8
    layers: list[int] | None = None  # resolved 0-based indices
    router: str = "topk"
    k: int = 2
    capacity: float | None = None  # top-k: None = no drops; expert choice: C (default 2)
    normalize: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UpcycleSpec":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None or not all(hasattr(layer, "mlp") for layer in layers):
        raise UserError(f"{type(model).__name__}: decoder layers with an .mlp are needed for upcycling", field="model")
    return layers


# config keys that transformers' MoE architectures (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek, GPT-OSS, ...) use for
# their expert count
MOE_CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def moe_config_field(config) -> tuple[str, int] | None:
    """(key, expert count) when the config says the model's MLPs are already mixtures of experts (2 or more
    experts), None for a dense model: upcycling one copies whole sparse blocks as "experts", which cannot run."""
    configs = [config]
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text is not None and text is not config:
        configs.append(text)
    for cfg in configs:
        for key in MOE_CONFIG_KEYS:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 2:
                return key, value
    return None


def refuse_moe_source(config, name: str) -> None:
    """A one-line refusal of a source model that is already a mixture of experts."""
    found = moe_config_field(config)
    if found is not None:
        key, value = found
        raise UserError(
            f"{name} is already a mixture of experts ({config.model_type} with {key} = {value} in its config); "
            "upcycling needs a dense model",
            field="model",
        )


def parse_layers(text: str, num_layers: int) -> list[int]:
    """every-other (0-based odd layers: 1, 3, ...), all, last:N, or a comma list i,j,k (0-based)."""
    text = text.strip()
    if text == "every-other":
        chosen = list(range(1, num_layers, 2))
        check_layers(chosen, num_layers)  # a 1-layer model has no odd layer
        return chosen
    if text == "all":
        return list(range(num_layers))
    if m := re.fullmatch(r"last:(\d+)", text):
        n = int(m.group(1))
        if not 1 <= n <= num_layers:
            raise UserError(f"last:{n} needs 1 <= N <= {num_layers} (the model's layers)", field="layers")
        return list(range(num_layers - n, num_layers))
    if re.fullmatch(r"\d+(,\d+)*", text):
        idx = sorted({int(t) for t in text.split(",")})
        bad = [i for i in idx if i >= num_layers]
        if bad:
            raise UserError(f"layer {bad[0]} does not exist; the model has layers 0..{num_layers - 1}", field="layers")
        return idx
    raise UserError(f"'{text}' is not a layer choice; use every-other, all, last:N or i,j,k", field="layers")


def check_layers(chosen: list[int], num_layers: int) -> None:
    """The chosen layers exist (0-based, no negatives), none is chosen twice, and there is at least one."""
    if not chosen:
        raise UserError(f"no layers to upcycle (the model has {num_layers}); choose some with --layers", field="layers")
    for i in chosen:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers:
            raise UserError(f"layer {i} does not exist; the model has layers 0..{num_layers - 1}", field="layers")
    if len(set(chosen)) != len(chosen):
        raise UserError(f"a layer is chosen twice in {chosen}", field="layers")


def validate(spec: UpcycleSpec) -> None:
    if spec.router not in ROUTERS:
        raise UserError(f"router '{spec.router}' unknown; choose {' or '.join(ROUTERS)}", field="router")
    if spec.experts < 2:
        raise UserError(f"experts must be at least 2, got {spec.experts}", field="experts")
    if spec.router == "topk" and not 1 <= spec.k <= spec.experts:
        raise UserError(f"k must be between 1 and experts ({spec.experts}), got {spec.k}", field="k")
    if spec.capacity is not None and not (math.isfinite(spec.capacity) and spec.capacity > 0):
        raise UserError(f"capacity must be a positive number, got {spec.capacity}", field="capacity")
    if spec.router == "expert-choice" and spec.normalize:
        raise UserError("renormalised weights are a top-k option", field="normalize")


def upcycle(model: nn.Module, spec: UpcycleSpec, *, seed: int = 0, copy_weights: bool = True) -> nn.Module:
    """Turn the MLPs of `spec.layers` into MoE blocks, in place; returns the model.

    `copy_weights=False` builds the structure only (for loading saved weights over it)."""
    validate(spec)
    layers = decoder_layers(model)
    if spec.layers is None:
        spec.layers = parse_layers("every-other", len(layers))
    check_layers(spec.layers, len(layers))
    if spec.router == "expert-choice" and spec.capacity is None:
        spec.capacity = 2.0
    if moe_blocks(model):
        raise UserError("the model is already upcycled", field="model")
    refuse_moe_source(model.config, type(model).__name__)
    sparse = [i for i in spec.layers if hasattr(layers[i].mlp, "experts")]
    if sparse:  # a MoE architecture under another config key: its MLP already holds experts
        raise UserError(
            f"{type(model).__name__}: the MLP of layer {sparse[0]} is already a mixture of experts; "
            "upcycling needs a dense model",
            field="model",
        )
    gen = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    for i in spec.layers:
        dense = layers[i].mlp
        experts = [dense] + [copy.deepcopy(dense) for _ in range(spec.experts - 1)]
        block = MoEBlock(
            experts, hidden, router=spec.router, k=spec.k, capacity=spec.capacity, normalize=spec.normalize
        )
        ref = next(dense.parameters())
        with torch.no_grad():
            w = torch.randn(block.router.weight.shape, generator=gen) * ROUTER_STD if copy_weights else None
            block.router.to(device=ref.device, dtype=ref.dtype)
            if w is not None:
                block.router.weight.copy_(w)
        block.train(dense.training)  # a new module trains; it must follow the model (no drops in eval)
        layers[i].mlp = block
    return model


def spec_of(model: nn.Module) -> UpcycleSpec | None:
    """The UpcycleSpec read back from the model's MoE blocks; None for a dense model."""
    blocks = moe_blocks(model)
    if not blocks:
        return None
    layers = [int(re.search(r"layers\.(\d+)\.mlp$", name).group(1)) for name, _ in blocks]
    b = blocks[0][1]
    return UpcycleSpec(
        experts=b.num_experts, layers=layers, router=b.router_type, k=b.k, capacity=b.capacity, normalize=b.normalize
    )


def is_upcycled(model: nn.Module) -> bool:
    return bool(moe_blocks(model))


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total parameters, parameters active per token, and the router/expert parts.

    Active per token: everything outside the MoE blocks, the routers, and k experts per block (top-k)
    or C experts per token on average (expert choice, T*E/n = C)."""
    total = sum(p.numel() for p in model.parameters())
    blocks = moe_blocks(model)
    router = sum(p.numel() for _, b in blocks for p in b.router.parameters())
    experts = sum(p.numel() for _, b in blocks for p in b.experts.parameters())
    active_experts = 0.0
    for _, b in blocks:
        per_expert = sum(p.numel() for p in b.experts[0].parameters())
        per_token = b.k if b.router_type == "topk" else min(b.capacity or 1.0, b.num_experts)
        active_experts += per_expert * per_token
    active = total - experts + int(round(active_experts))
    return {"total": total, "active_per_token": active, "router": router, "experts": experts, "moe_layers": len(blocks)}
