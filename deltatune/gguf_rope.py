"""A GGUF file's RoPE scaling, as the transformers config that computes the same positions.

transformers' GGUF loader reads no `<arch>.rope.scaling.*` key for most architectures (Llama among them) and
ignores the `rope_freqs.weight` tensor that llama.cpp writes for Llama 3.1 and later: such a file loaded with
unscaled RoPE, and every position past the first computed otherwise than the model. Here the scaling is put back
into the config where it can be reproduced exactly, and refused where it cannot.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch

from deltatune.errors import UserError

# Meta's Llama 3.1-3.3 (factor 8) and 3.2 (factor 32) use these; llama.cpp keeps only the per-dimension factors
# they produce, so they are tried first to give the config its published values.
_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_MATCH_RTOL = 1e-5


def gguf_rope_parameters(
    gguf_path: Path, metadata: dict[str, Any], tensor_names: tuple[str, ...], load_config: Callable[[], Any]
) -> dict[str, Any] | None:
    """The `rope_parameters` the config `load_config()` loads from `gguf_path` needs, or None where the loader's are
    right. The config is loaded only for a file that scales RoPE (parsing it reads every metadata key again)."""
    arch = metadata.get("general.architecture", "")
    legacy_linear = metadata.get(f"{arch}.rope.scale_linear")  # llama.cpp's key before rope.scaling.*
    kind = str(metadata.get(f"{arch}.rope.scaling.type", "linear" if legacy_linear else "none")).lower()
    factor = float(metadata.get(f"{arch}.rope.scaling.factor", legacy_linear or 1.0))
    if "rope_freqs.weight" in tensor_names:
        if kind != "none" and not (kind == "linear" and factor == 1.0):
            raise UserError(
                f"{gguf_path}: it scales RoPE twice (tensor rope_freqs.weight and {arch}.rope.scaling.type "
                f"'{kind}'); load the model's transformers folder instead",
                field="model",
            )
        config = load_config()
        return _llama3_from_frequency_factors(gguf_path, _read_rope_freqs(gguf_path), _rope_params(config), config)
    if kind not in ("none", "linear"):
        raise UserError(
            f"{gguf_path}: RoPE scaling '{kind}' ({arch}.rope.scaling.type) is not read by transformers' GGUF "
            "loader, and the model would compute otherwise; load the model's transformers folder instead",
            field="model",
        )
    if kind == "linear" and factor != 1.0:
        params = _rope_params(load_config())
        if params.get("rope_type", "default") == "default":  # the loader left it unscaled
            return {**params, "rope_type": "linear", "factor": factor}
    return None


def _rope_params(config: Any) -> dict[str, Any]:
    return dict(getattr(config, "rope_parameters", None) or {})


def _read_rope_freqs(gguf_path: Path) -> torch.Tensor:
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    tensor = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    return torch.tensor(tensor.data, dtype=torch.float64).flatten()


def _llama3_from_frequency_factors(
    gguf_path: Path, factors: torch.Tensor, params: dict[str, Any], config: Any
) -> dict[str, Any] | None:
    """Llama 3's RoPE parameters that divide each frequency by llama.cpp's stored factor, checked against
    transformers' own llama3 computation. The factors are 1 for short wavelengths, `factor` for long ones and
    `1 / ((1 - s) / factor + s)` between, where s is linear in 1 / wavelength: any (original length, low, high)
    with the same line gives the same frequencies, so the published defaults are tried first and the line is
    fitted otherwise."""
    if params.get("rope_type", "default") != "default":
        raise UserError(
            f"{gguf_path}: RoPE already of type '{params.get('rope_type')}' has per-dimension factors as well "
            "(rope_freqs.weight); load the model's transformers folder instead",
            field="model",
        )
    if torch.allclose(factors, torch.ones_like(factors), rtol=0, atol=_MATCH_RTOL):
        return None
    inv_freq = _default_inv_freq(config, params)
    if inv_freq.numel() != factors.numel():
        raise _unreproducible(gguf_path, f"{factors.numel()} factors for {inv_freq.numel()} frequencies")
    target = inv_freq / factors
    factor = float(factors.max())
    candidates = [{"factor": factor, **_LLAMA3_DEFAULTS}]
    fitted = _fit_smoothing_line(factors, inv_freq, factor)
    if fitted is not None:
        candidates.append(fitted)
    for candidate in candidates:
        rope = {**params, "rope_type": "llama3", **candidate}
        if torch.allclose(_llama3_inv_freq(config, rope), target, rtol=_MATCH_RTOL, atol=0):
            return rope
    raise _unreproducible(gguf_path, "they follow no Llama 3 scaling")


def _fit_smoothing_line(factors: torch.Tensor, inv_freq: torch.Tensor, factor: float) -> dict[str, Any] | None:
    """Low and high frequency factors from the factors between 1 and `factor` (two at least), for an original
    length of Meta's 8,192 tokens."""
    between = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    if int(between.sum()) < 2:
        return None
    smooth = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)
    x = inv_freq[between].double() / (2 * math.pi)  # 1 / wavelength
    slope, intercept = torch.linalg.lstsq(torch.stack([x, torch.ones_like(x)], 1), smooth.unsqueeze(1)).solution[:, 0]
    if slope <= 0 or intercept >= 0:
        return None
    original = _LLAMA3_DEFAULTS["original_max_position_embeddings"]
    low = float(-intercept * original / slope)
    return {
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": low + float(original / slope),
        "original_max_position_embeddings": original,
    }


def _default_inv_freq(config: Any, params: dict[str, Any]) -> torch.Tensor:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).double() / dim))


def _llama3_inv_freq(config: Any, rope: dict[str, Any]) -> torch.Tensor:
    """transformers' own llama3 frequencies for `rope`, on a copy of the config."""
    import copy

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    trial = copy.deepcopy(config)
    trial.rope_parameters = rope
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](trial, torch.device("cpu"))
    return inv_freq.double()


def _unreproducible(gguf_path: Path, why: str) -> UserError:
    return UserError(
        f"{gguf_path}: its per-dimension RoPE factors (tensor rope_freqs.weight) cannot be reproduced by "
        f"transformers ({why}); load the model's transformers folder instead",
        field="model",
    )
