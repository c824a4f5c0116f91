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

Initialisations (Lester et al. 2021, section 3): "random" (N(0, σ), σ the std of the vocabulary
embeddings), "text" (an init text's token embeddings), "vocab" (embeddings of tokens sampled from the
first `vocab_top` ids, 5,000 as the paper's "most common" tokens: byte-level BPE vocabularies put
frequent merges first; special tokens are skipped when the tokenizer is known) and "labels" (the
class-label words' embeddings, a multi-token label averaged, the remaining slots sampled vocabulary).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.kv_cache import cache_length, put_cache, take_cache
from deltatune.methods.base import MethodSpec, register
from deltatune.methods.options import Option, non_negative, positive_int
from deltatune.methods.virtual_tokens import (
    VirtualTokenMethod,
    attach,
    bind_kwargs,
    check_token_ids,
    drop_leading_positions,
    prepend_key_columns,
    prepend_virtual_rows,
    repeat_to,
    shift_positions,
    sliding_window,
    tokenizer_ids,
)

PROMPT_INITS = ("random", "text", "vocab", "labels")


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
        kw = bind_kwargs(decoder, args, kwargs)
        p = self.num_virtual_tokens
        past = take_cache(decoder, kw)
        put_cache(decoder, kw, past)
        first = not self.disabled and cache_length(past) == 0
        self._pending.append(first)
        if self.disabled:
            return (), kw
        window = sliding_window(decoder)
        if not first:  # continuing a cache that already holds the virtual tokens
            kw["position_ids"] = shift_positions(kw.get("position_ids"), p, with_virtual=False)
            kw["attention_mask"] = prepend_key_columns(kw.get("attention_mask"), p, kw["position_ids"], window)
            return (), kw
        embeds = kw.get("inputs_embeds")
        if embeds is None:
            embeds = decoder.get_input_embeddings()(kw["input_ids"])
        prompt = self.embedding.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        kw["input_ids"] = None
        kw["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        real_positions = shift_positions(kw.get("position_ids"), p, with_virtual=False)
        kw["attention_mask"] = prepend_virtual_rows(kw.get("attention_mask"), p, real_positions, window)
        kw["position_ids"] = shift_positions(kw.get("position_ids"), p, with_virtual=True)
        return (), kw

    def post_hook(self, decoder: nn.Module, args: tuple, output: Any) -> Any:
        return drop_leading_positions(output, self.num_virtual_tokens) if self._pending.pop() else output


@register
class PromptTuning(VirtualTokenMethod):
    """options: num_virtual_tokens p (default 20); init "random" | "text" | "vocab" | "labels" (module
    docstring); init_text / init_token_ids (text); vocab_top, init_seed (vocab, labels); class_labels /
    class_label_ids (labels). Text and labels need the tokenizer (option `tokenizer`) or the ids."""

    name = "prompt"
    why_not_mergeable = (
        "prompt tuning adds virtual input tokens, which are not a change to any weight; keep the "
        "adapter and load it with the base model (PEFT can load it too)"
    )
    peft_type = "PROMPT_TUNING"
    ATTR = "deltatune_prompt"
    PEFT_TENSOR = "embedding"
    LABEL = "prompt tuning"
    options_schema = {
        "num_virtual_tokens": Option(20, "number p of virtual tokens", (int,), check=positive_int),
        "init": Option(
            None,
            "random | text | vocab | labels (default: text when init_text or init_token_ids is "
            "given, labels when class labels are, else random)",
            (str,),
            choices=PROMPT_INITS,
        ),
        "init_text": Option(None, "text whose token embeddings start the prompt", (str,)),
        "init_token_ids": Option(None, "token ids whose embeddings start the prompt", (list,)),
        "class_labels": Option(None, "class-label words (init labels)", (list,)),
        "class_label_ids": Option(None, "token ids of each class label (init labels, without a tokenizer)", (list,)),
        "vocab_top": Option(
            5000, "sample init tokens from the first N ids (init vocab, labels)", (int,), check=positive_int
        ),
        "init_seed": Option(0, "seed of the sampled vocabulary", (int,), check=non_negative),
        "tokenizer": Option(None, "the tokenizer, for init_text and class_labels (not saved)"),
    }

    def __init__(self, spec: MethodSpec) -> None:
        from dataclasses import replace

        super().__init__(replace(spec, options=dict(spec.options)))  # apply() records the init ids in it
        o = self.options
        self.p = o["num_virtual_tokens"]
        has_text = o["init_text"] is not None or o["init_token_ids"] is not None
        has_labels = o["class_labels"] is not None or o["class_label_ids"] is not None
        self.init = o["init"] or ("text" if has_text else "labels" if has_labels else "random")
        if self.init == "text" and not has_text:
            raise ConfigError("prompt init 'text' needs init_text (or init_token_ids)", field="options.init_text")
        if self.init == "labels" and not has_labels:
            raise ConfigError(
                "prompt init 'labels' needs class_labels (or class_label_ids)", field="options.class_labels"
            )
        self.tokenizer = self.spec.options.pop("tokenizer", None)

    def _sampled_ids(self, n: int, vocab: int) -> list[int]:
        """n distinct ids drawn from the first `vocab_top` (special tokens skipped when known)."""
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        pool = [i for i in range(min(vocab, self.options["vocab_top"])) if i not in special]
        if len(pool) < n:
            raise ConfigError(
                f"prompt init: {n} tokens to sample but only {len(pool)} candidates", field="options.vocab_top"
            )
        g = torch.Generator().manual_seed(self.options["init_seed"])
        return [pool[int(i)] for i in torch.randperm(len(pool), generator=g)[:n]]

    def _label_ids(self, vocab_size: int) -> list[list[int]]:
        ids = self.options["class_label_ids"]
        if ids is None:
            if self.tokenizer is None:
                raise ConfigError(
                    "prompt init 'labels' needs the tokenizer for class_labels (or give class_label_ids)",
                    field="options.class_labels",
                )
            ids = [
                list(self.tokenizer(str(w), add_special_tokens=False)["input_ids"])
                for w in self.options["class_labels"]
            ]
        if not ids or any(not isinstance(x, list) or not x for x in ids):
            raise ConfigError("every class label must have at least one token", field="options.class_labels")
        check_token_ids([i for x in ids for i in x], vocab_size, "options.class_label_ids")
        if len(ids) > self.p:
            raise ConfigError(
                f"{len(ids)} class labels do not fit in {self.p} virtual tokens", field="options.num_virtual_tokens"
            )
        self.spec.options["class_label_ids"] = [[int(i) for i in x] for x in ids]  # re-applies without a tokenizer
        return ids

    @torch.no_grad()
    def initial_embeddings(self, table: torch.Tensor) -> torch.Tensor:
        """[p, d] float32 start values of the virtual tokens for the chosen init."""
        if table.device.type == "meta":  # a shapes-only copy (an adapter file checked before loading): no values
            return torch.empty(self.p, table.shape[1], device="meta")
        if self.init == "random":
            return torch.randn(self.p, table.shape[1], device=table.device) * float(table.float().std())
        if self.init == "text":
            ids = self.options["init_token_ids"]
            ids = tokenizer_ids(self, self.options["init_text"], self.p) if ids is None else repeat_to(ids, self.p)
            check_token_ids(ids, table.shape[0], "options.init_token_ids")
            # the saved spec then re-applies without a tokenizer (weights are loaded over it anyway)
            self.spec.options["init_token_ids"] = [int(i) for i in ids]
            return table[torch.tensor(ids, device=table.device)].float()
        rows: list[torch.Tensor] = []
        if self.init == "labels":
            rows = [
                table[torch.tensor(x, device=table.device)].float().mean(0) for x in self._label_ids(table.shape[0])
            ]
        fill = self._sampled_ids(self.p - len(rows), table.shape[0])
        rows += list(table[torch.tensor(fill, device=table.device, dtype=torch.long)].float())
        return torch.stack(rows)

    def apply(self, model: nn.Module) -> None:
        embed = model.get_input_embeddings()
        table = embed.weight
        module = PromptEmbedding(self.p, table.shape[1], device=table.device)
        # Gemma's embedding multiplies its rows by sqrt(d) in forward (embed_scale): virtual tokens start at the
        # size real tokens enter the decoder with, as PEFT's init (which calls the module) gives them
        scale = getattr(embed, "embed_scale", None)
        start = self.initial_embeddings(table)
        module.embedding.data.copy_(start if scale is None else start * float(scale))
        attach(model, self.ATTR, module)

    def trainable_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        yield f"{self.ATTR}.embedding", getattr(model, self.ATTR).embedding

    # --- PEFT interoperability ------------------------------------------------------------------
    def peft_config(self, model: nn.Module) -> dict[str, Any]:
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return {
            "num_virtual_tokens": self.p,
            "token_dim": int(model.get_input_embeddings().weight.shape[1]),
            "num_transformer_submodules": 1,
            "num_attention_heads": int(cfg.num_attention_heads),
            "num_layers": int(cfg.num_hidden_layers),
            "prompt_tuning_init": "RANDOM",
            "task_type": "CAUSAL_LM",
        }
