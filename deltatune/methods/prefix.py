"""Prefix tuning (Li & Liang 2021): trainable key and value prefixes K_p^l, V_p^l ∈ R^{p×kv_dim} for
every attention layer l, so that each layer computes softmax(Q [K_p; K]ᵀ/√d) [V_p; V]. Not mergeable.

Trainable parameters: L·2·p·kv_dim, with kv_dim = num_kv_heads·head_dim (grouped-query attention
stores fewer key/value heads than query heads). With `reparameterize` (the paper's stabiliser, as in
PEFT's `prefix_projection`): P' ∈ R^{p×kv_dim} -> Linear(kv_dim, hidden) -> tanh -> Linear(hidden,
L·2·kv_dim), i.e. p·kv + kv·h + h + h·L·2·kv + L·2·kv parameters; `fold(model)` replaces the MLP by
the prefixes it produces, which is all that needs exporting.

The prefixes reach the model through its cache interface, so any transformers decoder works: a
pre-hook on the decoder body hands it a `DynamicCache` already holding the prefixes (PEFT's layout and
convention: prefixes are stored as post-rotary keys, real tokens move to positions p.., every query sees
every prefix), extends the attention mask (2D: p ones in front; 4D packed masks: p visible columns for
every row) and shifts explicit `position_ids` by p. Outputs are already aligned to the real tokens. A
cache the hook created only for this call is not returned unless `use_cache` asked for it.

Storage layout = PEFT's `prompt_embeddings`: [p, L·2·kv_dim], each row ordered (layer, key|value, head,
head_dim), so a PEFT adapter loads without reshaping.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.kv_cache import cache_length, drop_output_cache, output_cache, put_cache, take_cache
from deltatune.methods.base import MethodSpec, register
from deltatune.methods.options import Option, positive_int
from deltatune.methods.virtual_tokens import (
    VirtualTokenMethod,
    attach,
    bind_kwargs,
    check_token_ids,
    prepend_key_columns,
    repeat_to,
    shift_positions,
    sliding_window,
    tokenizer_ids,
)


def kv_geometry(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head_dim) of a decoder config."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv_heads, head_dim


PREFIX_NOT_CHECKPOINTED = (
    "the prefix reaches attention through the cache, which transformers drops in checkpointed layers; turn "
    "gradient checkpointing off"
)


def _checkpointed(decoder: nn.Module) -> bool:
    """Whether transformers' gradient checkpointing is on for the decoder's layers (the flag its layers carry)."""
    layers = getattr(decoder, "layers", None)
    return bool(layers) and bool(getattr(layers[0], "gradient_checkpointing", False))


class PrefixEncoder(nn.Module):
    """Holds the prefixes (or P' and the MLP that makes them) and the decoder hooks that use them."""

    def __init__(
        self,
        p: int,
        layers: int,
        kv_heads: int,
        head_dim: int,
        *,
        reparameterize: bool = False,
        hidden: int = 512,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.p, self.layers, self.kv_heads, self.head_dim = p, layers, kv_heads, head_dim
        kv, out = kv_heads * head_dim, layers * 2 * kv_heads * head_dim
        self.reparameterize = reparameterize
        if reparameterize:  # raw parameters, not nn.Linear, so no "all-linear" method ever wraps them
            self.embedding = nn.Parameter(torch.randn(p, kv, device=device))  # nn.Embedding's N(0, 1), as PEFT
            self.w1 = nn.Parameter(torch.empty(hidden, kv, device=device))
            self.b1 = nn.Parameter(torch.empty(hidden, device=device))
            self.w2 = nn.Parameter(torch.empty(out, hidden, device=device))
            self.b2 = nn.Parameter(torch.empty(out, device=device))
            for w, b in ((self.w1, self.b1), (self.w2, self.b2)):  # nn.Linear's default init
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
                nn.init.uniform_(b, -1 / math.sqrt(w.shape[1]), 1 / math.sqrt(w.shape[1]))
        else:
            self.prefix = nn.Parameter(torch.randn(p, out, device=device))
        self.disabled = False
        self._drop_cache: list[bool] = []

    def flat(self) -> torch.Tensor:
        """[p, L·2·kv_dim] in PEFT's row layout."""
        if not self.reparameterize:
            return self.prefix
        h = torch.tanh(self.embedding @ self.w1.T + self.b1)
        return h @ self.w2.T + self.b2

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each [batch, kv_heads, p, head_dim]."""
        kv = self.flat().to(dtype).view(self.p, self.layers * 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return [
            (kv[2 * i].expand(batch, -1, -1, -1), kv[2 * i + 1].expand(batch, -1, -1, -1)) for i in range(self.layers)
        ]

    def pre_hook(self, decoder: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        from transformers import DynamicCache

        kw = bind_kwargs(decoder, args, kwargs)
        if not self.disabled and decoder.training and _checkpointed(decoder):  # a Trainer's gradient_checkpointing
            raise ConfigError(f"prefix tuning cannot train with gradient checkpointing: {PREFIX_NOT_CHECKPOINTED}")
        past, created = take_cache(decoder, kw), False
        put_cache(decoder, kw, past)
        if self.disabled:
            self._drop_cache.append(False)
            return (), kw
        if cache_length(past) == 0:
            if past is None:
                past, created = DynamicCache(config=decoder.config), True
            ref = kw["inputs_embeds"] if kw.get("inputs_embeds") is not None else kw["input_ids"]
            dtype = (
                kw["inputs_embeds"].dtype
                if kw.get("inputs_embeds") is not None
                else decoder.get_input_embeddings().weight.dtype
            )
            for layer, (k, v) in enumerate(self.key_values(ref.shape[0], dtype)):
                past.update(k, v, layer)
            put_cache(decoder, kw, past)
        kw["position_ids"] = shift_positions(kw.get("position_ids"), self.p, with_virtual=False)
        kw["attention_mask"] = prepend_key_columns(
            kw.get("attention_mask"), self.p, kw["position_ids"], sliding_window(decoder)
        )
        self._drop_cache.append(created and not kw.get("use_cache"))
        return (), kw

    def post_hook(self, decoder: nn.Module, args: tuple, output: Any) -> Any:
        if self._drop_cache.pop() and not isinstance(output, tuple):
            drop_output_cache(decoder, output)
        return output


@register
class PrefixTuning(VirtualTokenMethod):
    """options: num_virtual_tokens p (default 20); reparameterize (default False) with hidden (default 512);
    init "random" (N(0, 1), as PEFT) or "text" (the base model's own keys and values for init_text /
    init_token_ids, the paper's real-activation init; not with reparameterize)."""

    name = "prefix"
    why_not_mergeable = (
        "prefix tuning adds key/value vectors that every attention layer attends to; they are "
        "not a change to any weight; keep the adapter and load it with the base model"
    )
    peft_type = "PREFIX_TUNING"
    ATTR = "deltatune_prefix"
    PEFT_TENSOR = "prefix"
    LABEL = "prefix tuning"
    options_schema = {
        "num_virtual_tokens": Option(20, "number p of prefix positions", (int,), check=positive_int),
        "reparameterize": Option(
            False, "produce the prefixes by an MLP during training (the paper's stabiliser)", (bool,)
        ),
        "hidden": Option(512, "hidden width of the reparameterisation MLP", (int,), check=positive_int),
        "init": Option(
            None,
            "random (N(0, 1), as PEFT) or text (the base model's own keys and values; default "
            "when init_text or init_token_ids is given)",
            (str,),
            choices=("random", "text"),
        ),
        "init_text": Option(None, "text whose keys and values start the prefix", (str,)),
        "init_token_ids": Option(None, "token ids whose keys and values start the prefix", (list,)),
        "tokenizer": Option(None, "the tokenizer, for init_text (not saved)"),
    }

    def __init__(self, spec: MethodSpec) -> None:
        from dataclasses import replace

        super().__init__(replace(spec, options=dict(spec.options)))
        o = self.options
        self.p, self.hidden, self.reparameterize = o["num_virtual_tokens"], o["hidden"], o["reparameterize"]
        has_text = o["init_text"] is not None or o["init_token_ids"] is not None
        self.init = o["init"] or ("text" if has_text else "random")
        if self.init == "text" and (not has_text or self.reparameterize):
            raise ConfigError(
                "prefix init 'text' needs init_text (or init_token_ids) and reparameterize: false", field="options.init"
            )
        self.tokenizer = self.spec.options.pop("tokenizer", None)

    @property
    def why_not_gradient_checkpointing(self) -> str:
        return PREFIX_NOT_CHECKPOINTED

    def apply(self, model: nn.Module) -> None:
        from deltatune.train.packed_attention import sliding_window_of

        window, _ = sliding_window_of(model)
        if window is not None and self.p >= window - 1:
            raise ConfigError(
                f"a prefix of {self.p} positions does not fit {type(model).__name__}'s sliding window of {window} "
                f"tokens (its cache keeps {window - 1}); use num_virtual_tokens below {window - 1}",
                field="options.num_virtual_tokens",
            )
        layers, kv_heads, head_dim = kv_geometry(model.config)
        device = model.get_input_embeddings().weight.device
        module = PrefixEncoder(
            self.p, layers, kv_heads, head_dim, reparameterize=self.reparameterize, hidden=self.hidden, device=device
        )
        if self.init == "text":
            ids = self.spec.options.get("init_token_ids")
            ids = tokenizer_ids(self, self.spec.options["init_text"], self.p) if ids is None else repeat_to(ids, self.p)
            check_token_ids(ids, model.get_input_embeddings().weight.shape[0], "options.init_token_ids")
            self.spec.options["init_token_ids"] = [int(i) for i in ids]
            with torch.no_grad():
                module.prefix.copy_(real_token_prefix(model, ids))
        attach(model, self.ATTR, module)

    def trainable_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in getattr(model, self.ATTR).named_parameters():
            yield f"{self.ATTR}.{name}", p

    @torch.no_grad()
    def fold(self, model: nn.Module) -> None:
        """Replace the reparameterisation MLP by the prefixes it produces (call after training, before
        the final save). The output is unchanged; the adapter then holds only L·2·p·kv_dim numbers and
        is exportable in PEFT's format."""
        module: PrefixEncoder = getattr(model, self.ATTR)
        if not module.reparameterize:
            return
        flat = module.flat().detach().clone()
        for name in ("embedding", "w1", "b1", "w2", "b2"):
            delattr(module, name)
        module.reparameterize = False
        module.prefix = nn.Parameter(flat, requires_grad=True)
        self.reparameterize = False
        self.spec.options["reparameterize"] = False
        self.spec.options.pop("hidden", None)

    def finalize(self, model: nn.Module) -> None:
        self.fold(model)

    # --- PEFT interoperability ------------------------------------------------------------------
    def peft_config(self, model: nn.Module) -> dict[str, Any] | None:
        if self.reparameterize:  # PEFT stores only the produced prefixes: fold first
            return None
        layers, kv_heads, head_dim = kv_geometry(model.config)
        return {
            "num_virtual_tokens": self.p,
            "token_dim": kv_heads * head_dim,
            "num_transformer_submodules": 1,
            "num_attention_heads": kv_heads,
            "num_layers": layers,
            "encoder_hidden_size": kv_heads * head_dim,
            "prefix_projection": False,
            "task_type": "CAUSAL_LM",
        }


@torch.no_grad()
def real_token_prefix(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """The base model's own cached keys and values for `ids`, in the [p, L·2·kv_dim] layout: a prefix
    equal to having those tokens in front of the input."""
    decoder = model.get_decoder()
    out = decoder(input_ids=torch.tensor([ids], device=model.get_input_embeddings().weight.device), use_cache=True)
    per_layer = [torch.stack([layer.keys[0], layer.values[0]]) for layer in output_cache(decoder, out).layers]
    kv = torch.stack(per_layer)  # [L, 2, kv_heads, p, head_dim]
    return kv.permute(3, 0, 1, 2, 4).reshape(len(ids), -1).float()
