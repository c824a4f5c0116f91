"""Prompt tuning (Lester et al. 2021): p trainable virtual-token embeddings P ∈ R^{p×d_model} prepended
to the input embeddings; only P trains. Trainable parameters = p·d_model. Not mergeable.

How it reaches the model (shared with prefix tuning): forward hooks on the decoder body
(`model.get_decoder()`, e.g. `LlamaModel`), torch's public hook API, no patched classes. After
`apply(model)` the model itself takes the usual arguments and returns outputs for the ORIGINAL tokens
only, so a training loop, `model(...)` with labels, and evaluation code need no change:

    model.get_decoder()(input_ids, attention_mask, position_ids)   # -> last_hidden_state [B, T, H]
    model(input_ids, attention_mask, position_ids, labels=...)     # -> logits [B, T, V], loss as the base

On the first call of a sequence (no cache, or an empty one) the hook
- embeds `input_ids` and prepends P (inputs_embeds = [P; E(x)]),
- extends `attention_mask`: 2D [B, T] gets p ones in front; 4D [B, 1, T, T] (packed rows, bool or
  additive) becomes [B, 1, p+T, p+T]: virtual rows are causal among themselves and see no real token,
  every real row sees all p virtual tokens plus what the original mask allowed,
- gives virtual tokens positions 0..p-1 and real tokens `position_ids + p` (None stays None: the model
  counts 0..p+T-1 itself, which is the same thing and what PEFT does);
and the post-hook drops the first p positions of `last_hidden_state` (and of `hidden_states`).
Later calls that continue a cache (generation) only extend the mask by p and shift positions by p.
Every packed example therefore sees the same virtual tokens at the same positions as it would alone.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.methods.base import Method, MethodSpec, register

_DECODER_ARGS = ("input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds", "use_cache")


# --- shared plumbing for methods that add virtual positions (prompt and prefix tuning) -------------
def bind_kwargs(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional decoder arguments -> keywords, so the hooks see one shape of call."""
    out = dict(kwargs)
    for name, value in zip(_DECODER_ARGS, args):
        out[name] = value
    return out


def cache_length(past: Any) -> int:
    return 0 if past is None else int(past.get_seq_length())


def _allowed(mask: torch.Tensor, shape: tuple[int, ...], allowed: bool) -> torch.Tensor:
    """A block of a 4D mask: bool masks say True/False, additive masks say 0 / most negative."""
    if mask.dtype == torch.bool:
        return torch.full(shape, allowed, dtype=torch.bool, device=mask.device)
    return torch.full(shape, 0.0 if allowed else torch.finfo(mask.dtype).min, dtype=mask.dtype, device=mask.device)


def prepend_key_columns(mask: torch.Tensor | None, p: int) -> torch.Tensor | None:
    """Let every query see p extra keys in front (prefix keys, or virtual tokens already in a cache)."""
    if mask is None:
        return None
    if mask.dim() == 2:
        return torch.cat([torch.ones(mask.shape[0], p, dtype=mask.dtype, device=mask.device), mask], dim=1)
    if mask.dim() == 4:
        b, h, q, _ = mask.shape
        return torch.cat([_allowed(mask, (b, h, q, p), True), mask], dim=3)
    raise ConfigError(f"attention_mask must be 2D or 4D, got {mask.dim()}D", field="attention_mask")


def prepend_virtual_rows(mask: torch.Tensor | None, p: int) -> torch.Tensor | None:
    """Mask for p virtual tokens prepended to the sequence (queries and keys both grow by p)."""
    if mask is None or mask.dim() == 2:
        return prepend_key_columns(mask, p)
    if mask.dim() != 4:
        raise ConfigError(f"attention_mask must be 2D or 4D, got {mask.dim()}D", field="attention_mask")
    b, h, q, k = mask.shape
    causal = torch.ones(p, p, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        virt = causal.expand(b, h, p, p)
    else:
        virt = torch.zeros(p, p, dtype=mask.dtype, device=mask.device).masked_fill(~causal, torch.finfo(mask.dtype).min)
        virt = virt.expand(b, h, p, p)
    top = torch.cat([virt, _allowed(mask, (b, h, p, k), False)], dim=3)
    bottom = torch.cat([_allowed(mask, (b, h, q, p), True), mask], dim=3)
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


def tokenizer_ids(method: Method, text: str, p: int) -> list[int]:
    """The init text's token ids, repeated or truncated to exactly p (as PEFT's TEXT init does)."""
    tokenizer = getattr(method, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError(f"method '{method.name}': init_text needs the tokenizer (set `method.tokenizer` before "
                          "apply, or give init_token_ids)", field="options.init_text")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ConfigError(f"method '{method.name}': init_text {text!r} tokenises to nothing", field="options.init_text")
    return (ids * (p // len(ids) + 1))[:p]


def read_int_option(spec: MethodSpec, key: str, default: int) -> int:
    value = spec.options.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"method '{spec.name}': {key} must be a positive integer, got {value!r}",
                          field=f"options.{key}")
    return value


def check_options(spec: MethodSpec, allowed: set[str]) -> None:
    unknown = sorted(set(spec.options) - allowed)
    if unknown:
        raise ConfigError(f"unknown {spec.name} option(s): {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}",
                          field="options")


# --- prompt tuning -------------------------------------------------------------------------------
class PromptEmbedding(nn.Module):
    """The p virtual-token embeddings and the decoder hooks that splice them in."""

    def __init__(self, p: int, d: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> None:
        super().__init__()
        self.num_virtual_tokens = p
        self.embedding = nn.Parameter(torch.empty(p, d, dtype=dtype, device=device))
        self.disabled = False
        self._pending: list[bool] = []  # one entry per decoder call in flight: did we prepend?

    def pre_hook(self, decoder: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        kw = bind_kwargs(args, kwargs)
        p = self.num_virtual_tokens
        first = not self.disabled and cache_length(kw.get("past_key_values")) == 0
        self._pending.append(first)
        if self.disabled:
            return (), kw
        if not first:  # continuing a cache that already holds the virtual tokens
            kw["attention_mask"] = prepend_key_columns(kw.get("attention_mask"), p)
            kw["position_ids"] = shift_positions(kw.get("position_ids"), p, with_virtual=False)
            return (), kw
        embeds = kw.get("inputs_embeds")
        if embeds is None:
            embeds = decoder.get_input_embeddings()(kw["input_ids"])
        prompt = self.embedding.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        kw["input_ids"] = None
        kw["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        kw["attention_mask"] = prepend_virtual_rows(kw.get("attention_mask"), p)
        kw["position_ids"] = shift_positions(kw.get("position_ids"), p, with_virtual=True)
        return (), kw

    def post_hook(self, decoder: nn.Module, args: tuple, output: Any) -> Any:
        return drop_leading_positions(output, self.num_virtual_tokens) if self._pending.pop() else output


def attach(model: nn.Module, attr: str, module: nn.Module) -> None:
    """Put `module` on the causal LM under `attr` and hook it into the decoder body."""
    if hasattr(model, attr):
        raise ConfigError(f"the model already has '{attr}': a virtual-token method is applied twice", field="method")
    model.add_module(attr, module)
    decoder = model.get_decoder()
    module._handles = [decoder.register_forward_pre_hook(module.pre_hook, with_kwargs=True),
                       decoder.register_forward_hook(module.post_hook)]


@register
class PromptTuning(Method):
    """options: num_virtual_tokens p (default 20); init "random" (N(0, σ) with σ the std of the vocabulary
    embeddings) or "text" (init_text's token embeddings, repeated or truncated to p; needs the tokenizer,
    or give init_token_ids)."""

    name = "prompt"
    kind = "addition"
    mergeable = False
    why_not_mergeable = ("prompt tuning adds virtual input tokens, which are not a change to any weight; keep the "
                         "adapter and load it with the base model (PEFT can load it too)")
    peft_type = "PROMPT_TUNING"
    ATTR = "deltatune_prompt"
    OPTIONS = {"num_virtual_tokens", "init", "init_text", "init_token_ids", "tokenizer"}

    def __init__(self, spec: MethodSpec) -> None:
        from dataclasses import replace

        super().__init__(replace(spec, options=dict(spec.options)))  # apply() records the init ids in it
        spec = self.spec
        check_options(spec, self.OPTIONS)
        self.p = read_int_option(spec, "num_virtual_tokens", 20)
        has_text = "init_text" in spec.options or "init_token_ids" in spec.options
        self.init = str(spec.options.get("init", "text" if has_text else "random")).lower()
        if self.init not in {"random", "text"}:
            raise ConfigError(f"prompt init must be 'random' or 'text', got {self.init!r}", field="options.init")
        if self.init == "text" and not has_text:
            raise ConfigError("prompt init 'text' needs init_text (or init_token_ids)", field="options.init_text")
        self.tokenizer = spec.options.pop("tokenizer", None)

    def apply(self, model: nn.Module) -> None:
        table = model.get_input_embeddings().weight
        module = PromptEmbedding(self.p, table.shape[1], device=table.device)
        with torch.no_grad():
            if self.init == "text":
                ids = self.spec.options.get("init_token_ids")
                ids = tokenizer_ids(self, self.spec.options["init_text"], self.p) if ids is None else \
                    (list(ids) * (self.p // max(1, len(ids)) + 1))[:self.p]
                # the saved spec then re-applies without a tokenizer (weights are loaded over it anyway)
                self.spec.options["init_token_ids"] = [int(i) for i in ids]
                module.embedding.copy_(table[torch.tensor(ids, device=table.device)].float())
            else:
                module.embedding.normal_(0.0, float(table.float().std()))
        attach(model, self.ATTR, module)

    def trainable_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        yield f"{self.ATTR}.embedding", getattr(model, self.ATTR).embedding

    # --- PEFT interoperability ------------------------------------------------------------------
    def peft_config(self, model: nn.Module) -> dict[str, Any]:
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return {"num_virtual_tokens": self.p, "token_dim": int(model.get_input_embeddings().weight.shape[1]),
                "num_transformer_submodules": 1, "num_attention_heads": int(cfg.num_attention_heads),
                "num_layers": int(cfg.num_hidden_layers), "prompt_tuning_init": "RANDOM", "task_type": "CAUSAL_LM"}

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> MethodSpec | None:
        if config.get("peft_type") not in (None, cls.peft_type):
            return None
        if int(config.get("num_transformer_submodules") or 1) != 1:
            raise ConfigError("PEFT prompt tuning for encoder-decoder models is not supported", field="peft_type")
        return MethodSpec(name=cls.name, options={"num_virtual_tokens": int(config["num_virtual_tokens"])})

    def to_peft_key(self, name: str) -> str:
        return "prompt_embeddings"

    def from_peft_key(self, key: str) -> str:
        if key != "prompt_embeddings":
            raise ConfigError(f"unexpected key '{key}' in a PEFT prompt-tuning adapter (expected 'prompt_embeddings')")
        return f"{self.ATTR}.embedding"
