"""Plumbing shared by the methods that add virtual positions (prompt and prefix tuning).

Both reach the model through forward hooks on the decoder body (`model.get_decoder()`), torch's public
hook API: the pre-hook sees the decoder's keyword arguments, extends the attention mask, shifts
positions and (prefix tuning) hands in a cache, under the name this transformers version gives it
(`deltatune/kv_cache.py`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.kv_cache import cache_key
from deltatune.methods.base import Method, MethodSpec


class VirtualTokenMethod(Method):
    """What prompt and prefix tuning share: one module attached to the model under `ATTR`, nothing to merge, and
    PEFT's file layout (one tensor, `prompt_embeddings`, which is the module's `PEFT_TENSOR`)."""

    kind = "addition"
    mergeable = False
    adds_virtual_tokens = True
    ATTR: str
    PEFT_TENSOR: str  # the module's parameter PEFT saves as prompt_embeddings
    LABEL: str  # "prompt tuning", for messages

    def switchable_modules(self, model: nn.Module) -> list[nn.Module]:
        return [getattr(model, self.ATTR)]

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> MethodSpec | None:
        if config.get("peft_type") not in (None, cls.peft_type):
            return None
        if int(config.get("num_transformer_submodules") or 1) != 1:
            raise ConfigError(f"PEFT {cls.LABEL} for encoder-decoder models is not supported", field="peft_type")
        from deltatune.methods.peft_format import refuse_peft_options

        refuse_peft_options(config, cls.LABEL, ("modules_to_save",))  # its keys were blamed as unexpected
        # PEFT saves prefix tuning's produced prefixes even with prefix_projection: they load as plain prefixes
        return MethodSpec(name=cls.name, options={"num_virtual_tokens": int(config["num_virtual_tokens"])})

    def to_peft_key(self, name: str) -> str:
        return "prompt_embeddings"

    def from_peft_key(self, key: str) -> str:
        if key != "prompt_embeddings":
            raise ConfigError(
                f"unexpected key '{key}' in a PEFT {self.LABEL.replace(' ', '-')} adapter (expected 'prompt_embeddings')"
            )
        return f"{self.ATTR}.{self.PEFT_TENSOR}"


def decoder_args(decoder: nn.Module) -> tuple[str, ...]:
    """The decoder's leading positional arguments, by name."""
    return ("input_ids", "attention_mask", "position_ids", cache_key(decoder), "inputs_embeds", "use_cache")


def bind_kwargs(decoder: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional decoder arguments -> keywords, so the hooks see one shape of call."""
    out = dict(kwargs)
    for name, value in zip(decoder_args(decoder), args):
        out[name] = value
    return out


def _allowed(mask: torch.Tensor, shape: tuple[int, ...], allowed: bool) -> torch.Tensor:
    """A block of a 4D mask: bool masks say True/False, additive masks say 0 / most negative."""
    if mask.dtype == torch.bool:
        return torch.full(shape, allowed, dtype=torch.bool, device=mask.device)
    return torch.full(shape, 0.0 if allowed else torch.finfo(mask.dtype).min, dtype=mask.dtype, device=mask.device)


def _as_mask(mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """A boolean block (True = may attend) in `mask`'s kind: bool, or additive 0 / most negative."""
    if mask.dtype == torch.bool:
        return keep
    return torch.zeros(keep.shape, dtype=mask.dtype, device=mask.device).masked_fill(~keep, torch.finfo(mask.dtype).min)


def sliding_window(decoder: nn.Module) -> int | None | dict[str, int | None]:
    """The window a 4D mask given to the model must carry (transformers uses such a mask as given): the window of a
    model whose every layer slides (Mistral, Phi3), None for full attention, and for a model that mixes the two
    (Gemma2/3) the window of each layer type, for masks given per layer type."""
    from deltatune.train.packed_attention import sliding_window_of

    window, every_layer = sliding_window_of(decoder)
    if window is None or every_layer:
        return window
    return {"full_attention": None, "sliding_attention": window}


def _per_layer_type(build: Callable[..., Any], mask: Any, window: int | None | dict[str, int | None], *args) -> Any:
    """`build(mask, *args, window)` for one mask, or for each of a per-layer-type mapping with that type's window."""
    if isinstance(mask, dict):
        windows = window if isinstance(window, dict) else {}
        return {kind: build(m, *args, windows.get(kind)) for kind, m in mask.items()}
    return build(mask, *args, None if isinstance(window, dict) else window)


def _virtual_columns(
    mask: torch.Tensor, p: int, query_positions: torch.Tensor | None, window: int | None
) -> torch.Tensor:
    """[b, h, q, p]: which queries see the p virtual positions 0..p-1: all of them, or under a sliding window those
    fewer than `window` positions away (a query at position P sees j when P - j < window, as transformers)."""
    b, h, q, _ = mask.shape
    if window is None or query_positions is None:
        return _allowed(mask, (b, h, q, p), True)
    keep = (query_positions[:, :, None] - torch.arange(p, device=mask.device)) < window
    return _as_mask(mask, keep[:, None].expand(b, h, q, p))


def prepend_key_columns(mask: Any, p: int, query_positions: torch.Tensor | None = None, window: Any = None) -> Any:
    """Let every query see p extra keys in front (prefix keys, or virtual tokens already in a cache); with a 4D mask
    and a sliding `window`, only the queries (at `query_positions`, virtual tokens counted) it reaches. A mask per
    layer type (a dict) gets each type's window."""
    if isinstance(mask, dict) or isinstance(window, dict):
        return _per_layer_type(prepend_key_columns, mask, window, p, query_positions)
    if mask is None:
        return None
    if mask.dim() == 2:
        return torch.cat([torch.ones(mask.shape[0], p, dtype=mask.dtype, device=mask.device), mask], dim=1)
    if mask.dim() == 4:
        return torch.cat([_virtual_columns(mask, p, query_positions, window), mask], dim=3)
    raise ConfigError(f"attention_mask must be 2D or 4D, got {mask.dim()}D", field="attention_mask")


def prepend_virtual_rows(mask: Any, p: int, query_positions: torch.Tensor | None = None, window: Any = None) -> Any:
    """Mask for p virtual tokens prepended to the sequence (queries and keys both grow by p); `query_positions`
    and `window` as in `prepend_key_columns` (the real tokens' positions)."""
    if isinstance(mask, dict) or isinstance(window, dict):
        return _per_layer_type(prepend_virtual_rows, mask, window, p, query_positions)
    if mask is None or mask.dim() == 2:
        return prepend_key_columns(mask, p)
    if mask.dim() != 4:
        raise ConfigError(f"attention_mask must be 2D or 4D, got {mask.dim()}D", field="attention_mask")
    b, h, q, k = mask.shape
    i = torch.arange(p, device=mask.device)
    causal = (i[:, None] >= i[None, :]) & ((i[:, None] - i[None, :]) < (window or p + 1))
    top = torch.cat([_as_mask(mask, causal.expand(b, h, p, p)), _allowed(mask, (b, h, p, k), False)], dim=3)
    bottom = torch.cat([_virtual_columns(mask, p, query_positions, window), mask], dim=3)
    return torch.cat([top, bottom], dim=2)


def shift_positions(position_ids: torch.Tensor | None, p: int, *, with_virtual: bool) -> torch.Tensor | None:
    """Real tokens move p positions right; with_virtual also prepends the virtual positions 0..p-1."""
    if position_ids is None:
        return None
    shifted = position_ids + p
    if not with_virtual:
        return shifted
    virtual = torch.arange(p, dtype=position_ids.dtype, device=position_ids.device).expand(shifted.shape[0], p)
    return torch.cat([virtual, shifted], dim=1)


def drop_leading_positions(output: Any, p: int) -> Any:
    """Post-hook helper: the decoder's outputs for the original tokens only."""
    if isinstance(output, tuple):
        return (output[0][:, p:],) + output[1:]
    output.last_hidden_state = output.last_hidden_state[:, p:]
    if getattr(output, "hidden_states", None) is not None:
        output.hidden_states = tuple(h[:, p:] for h in output.hidden_states)
    return output


def tokenizer_ids(method: Any, text: str, p: int) -> list[int]:
    """The init text's token ids, repeated or truncated to exactly p (as PEFT's TEXT init does)."""
    tokenizer = getattr(method, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError(
            f"method '{method.name}': init_text needs the tokenizer (set `method.tokenizer` before "
            "apply, or give init_token_ids)",
            field="options.init_text",
        )
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ConfigError(f"method '{method.name}': init_text {text!r} tokenises to nothing", field="options.init_text")
    return (ids * (p // len(ids) + 1))[:p]


_ATTRS: set[str] = set()  # the attribute names virtual-token methods attach under


def attach(model: nn.Module, attr: str, module: nn.Module) -> None:
    """Put `module` on the causal LM under `attr` and hook it into the decoder body."""
    if hasattr(model, attr):
        raise ConfigError(f"the model already has '{attr}': a virtual-token method is applied twice", field="method")
    _ATTRS.add(attr)
    model.add_module(attr, module)
    decoder = model.get_decoder()
    module._handles = [
        decoder.register_forward_pre_hook(module.pre_hook, with_kwargs=True),
        decoder.register_forward_hook(module.post_hook),
    ]


def has_virtual_tokens(model: nn.Module) -> bool:
    """Whether a virtual-token method is attached: every sequence then attends to extra positions, so examples
    cannot be laid end to end in one row."""
    return any(hasattr(model, attr) for attr in _ATTRS)


def prepended_tokens(model: nn.Module) -> int:
    """How many positions a virtual-token method prepends to the decoder's input in a forward without a cache:
    prompt tuning's p while it is enabled; 0 without it (prefix tuning adds key/value columns, not positions)."""
    modules = (getattr(model, attr, None) for attr in _ATTRS)
    return sum(
        m.num_virtual_tokens for m in modules if hasattr(m, "num_virtual_tokens") and not getattr(m, "disabled", False)
    )


def virtual_positions(model: nn.Module) -> int:
    """Positions the virtual tokens take before a prompt, while enabled: prompt tuning's prepended tokens and
    prefix tuning's key/value columns (they shift every real position by their count). A prompt must leave them
    room in the model's context (a learned position table ends there)."""
    total = 0
    for module in (getattr(model, attr, None) for attr in _ATTRS):
        if module is not None and not getattr(module, "disabled", False):
            total += getattr(module, "num_virtual_tokens", None) or getattr(module, "p", 0)
    return total


def repeat_to(ids: list[int], p: int) -> list[int]:
    """`ids` repeated or truncated to exactly p (as PEFT's TEXT init does)."""
    if not ids:
        raise ConfigError("init token ids are empty", field="options.init_token_ids")
    return (list(ids) * (p // len(ids) + 1))[:p]


def check_token_ids(ids: list[Any], vocab_size: int, field: str) -> None:
    """One-line error for an init token id that is not an id of the model's vocabulary."""
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size]
    if bad:
        raise ConfigError(
            f"init token id {bad[0]!r} is not in the model's vocabulary (ids 0..{vocab_size - 1})", field=field
        )
