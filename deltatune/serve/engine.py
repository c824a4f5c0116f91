"""Batched generation where each row names its own adapter: one forward pass per step for all rows.

A batch is left-padded, prefilled once into a transformers `DynamicCache`, then decoded one token per
step. Each row has its own sampling settings (greedy, or temperature / top-k / top-p with its own seeded
generator, so a seeded row gives the same text whatever else shares its batch), its own stop strings and
token budget. A row that finishes leaves the batch at once (its cache rows are dropped with
`DynamicCache.batch_select_indices`), and the others go on. Text is streamed through per-request
callbacks: a delta is released only when it cannot be the start of a stop string and ends on a whole
character.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from deltatune.detokenize import CONTEXT_TOKENS, ContinuationDecoder
from deltatune.evaluate.generate import GREEDY_BELOW
from deltatune.kv_cache import cache_kwargs
from deltatune.serve.adapters import MultiAdapterModel
from deltatune.upcycle.moe import moe_blocks, routed_tokens

FinishReason = str  # "stop" | "length" | "cancelled" ("error": the row failed alone, see `_Row.fail`)


def usable_scores(logits: torch.Tensor) -> torch.Tensor:
    """Per row: scores a token can be chosen from. NaN or +inf are not; -inf is (a masked entry has probability
    0; a vocabulary masked as a whole is not)."""
    return ~(torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | torch.isneginf(logits).all(-1))


class NonFiniteScores(RuntimeError):
    """The model's scores for a row went NaN or infinite: that row fails, the batch goes on."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError("seed must be in [-2**63, 2**64)")


@dataclass
class GenResult:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    ended_on_stop_token: bool = False  # an end-of-sequence token was generated (not part of token_ids or text)

    @property
    def completion_tokens(self) -> int:
        """Every token generated, the end-of-sequence token included, as OpenAI and vLLM count them."""
        return len(self.token_ids) + self.ended_on_stop_token


@dataclass
class GenRequest:
    """One row: prompt token ids, the adapter it uses (None = base), and optional streaming callbacks."""

    prompt_ids: list[int]
    adapter: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    on_text: Callable[[str], None] | None = None  # each newly released piece of text
    on_finish: Callable[[GenResult], None] | None = None
    on_error: Callable[[Exception], None] | None = None  # used by the server's batcher
    cancelled: bool = False  # set from another thread to drop the row at the next step


class _Row:
    """Decoding state of one request inside a running batch."""

    def __init__(self, req: GenRequest, tokenizer, stop_ids: set[int]) -> None:
        self.req, self.stop_ids, self.tokenizer = req, stop_ids, tokenizer
        self.decode = ContinuationDecoder(tokenizer, req.prompt_ids, skip_special_tokens=True)
        # text of ids[:done_ids], fixed: each token decodes only the ids after it (decoding the whole continuation
        # after every token cost 1.9 s a row at 4,000 tokens, on the thread that holds the batch)
        self.done_text, self.done_ids = "", 0
        self.longest_stop = max((len(s) for s in req.params.stop if s), default=0)
        self.ids: list[int] = []
        self.sent = 0  # characters already released through on_text
        self.text = ""
        self.finish: FinishReason | None = None
        self.ended_on_stop_token = False
        p = req.params
        self.greedy = p.temperature < GREEDY_BELOW
        self.gen = None
        if not self.greedy:
            seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            self.gen = torch.Generator().manual_seed(seed)

    def push(self, token: int) -> None:
        p = self.req.params
        if self.req.cancelled:
            self.finish = "cancelled"
            return
        if token in self.stop_ids:
            self.finish, self.ended_on_stop_token = "stop", True
        else:
            self.ids.append(token)
            # the text before done_text's end is fixed and was searched: a stop ending there was found already
            searched = max(0, len(self.done_text) - self.longest_stop + 1)
            fresh = self.decode(self.ids[self.done_ids :])
            self.text = self.done_text + fresh
            behind = (list(self.req.prompt_ids[-CONTEXT_TOKENS:]) + self.ids)[-CONTEXT_TOKENS:]
            # fixed only behind tokens that decode to text: behind skipped special tokens alone, a SentencePiece
            # decoder dropped the space that starts the next word
            if (
                len(self.ids) - self.done_ids >= _DECODE_WINDOW
                and not fresh.endswith("\ufffd")
                and self.tokenizer.decode(behind, skip_special_tokens=True).strip()
            ):
                self.done_text, self.done_ids = self.text, len(self.ids)  # behind the last tokens, as the prompt
                self.decode = ContinuationDecoder(self.tokenizer, behind, skip_special_tokens=True)
            cut = _first_stop(self.text[searched:], p.stop)
            if cut is not None:
                self.text, self.finish = self.text[: searched + cut], "stop"
            elif len(self.ids) >= p.max_tokens:
                self.finish = "length"
        self._release()

    def fail(self, exc: Exception) -> None:
        """End this row with an error, reported to its request alone."""
        self.finish = "error"
        if self.req.on_error is not None:
            self.req.on_error(exc)

    def _release(self) -> None:
        if self.req.on_text is None:
            return
        text = self.text
        if self.finish is None:
            if text.endswith("\ufffd"):  # a multi-byte character not complete yet
                text = text.rstrip("\ufffd")
            text = text[: len(text) - _held_back(text, self.req.params.stop)]
        if len(text) > self.sent:
            self.req.on_text(text[self.sent :])
            self.sent = len(text)

    def result(self) -> GenResult:
        return GenResult(
            text=self.text,
            token_ids=list(self.ids),
            finish_reason=self.finish or "length",
            prompt_tokens=len(self.req.prompt_ids),
            ended_on_stop_token=self.ended_on_stop_token,
        )


_DECODE_WINDOW = 32  # tokens decoded again at each step before their text is fixed


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is a proper start of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def sample_next(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """One token from a row's logits (V,): argmax when greedy, else temperature, top-k, top-p, then a draw."""
    if params.temperature == 0:
        return int(logits.argmax())
    scores = logits.float() / params.temperature
    if params.top_k and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1:
        order = torch.argsort(scores, descending=True)
        probs = torch.softmax(scores[order], dim=-1)
        before = probs.cumsum(0) - probs  # mass of the tokens ranked above each one
        drop = order[before >= params.top_p]  # keep the smallest set whose mass reaches top_p
        scores = scores.index_fill(0, drop, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


class Engine:
    """Generates for a list of requests in one batch, each row with its own adapter."""

    def __init__(self, adapters: MultiAdapterModel, tokenizer) -> None:
        from deltatune.evaluate.generate import stop_token_ids

        self.adapters, self.model, self.tokenizer = adapters, adapters.model, tokenizer
        self.stop_ids = set(stop_token_ids(tokenizer, adapters.model))  # the model's own end ids too (Gemma)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None
        self.device = next(self.model.parameters()).device
        self.moe = [block for _, block in moe_blocks(self.model)]  # upcycled MoE blocks: padding never routes
        self.stats = {"steps": 0, "tokens": 0, "seconds": 0.0}

    def encode_chat(self, messages: list[dict], chat_template: str | None = None) -> list[int]:
        """The chat template's text as it stands: the template writes BOS itself where the model wants one.
        `chat_template`: an adapter's own (its training template) instead of the tokenizer's."""
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=False, add_generation_prompt=True
        )
        return self.encode(text, add_special_tokens=False)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """A completions prompt with the tokenizer's own special tokens (BOS for Llama-style models), as
        `deltatune eval` and vLLM encode raw prompts."""
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def check(self, request: GenRequest) -> None:
        """Raise ValueError if `request` cannot run (so a caller can refuse it alone, not its whole batch)."""
        if not request.prompt_ids:
            raise ValueError("a prompt must have at least one token")
        virtual = self.adapters.virtual_tokens(request.adapter)
        n = len(request.prompt_ids) + (0 if virtual is None else virtual.shape[0])
        if self.context and n + request.params.max_tokens > self.context:
            raise ValueError(
                f"prompt ({n} tokens) plus max_tokens ({request.params.max_tokens}) "
                f"exceeds the context of {self.context} tokens"
            )

    @torch.inference_mode()
    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        """Run every request to completion (rows leave as they finish); results in request order."""
        from transformers import DynamicCache

        if not requests:
            return []
        virtual = [self.adapters.virtual_tokens(r.adapter) for r in requests]
        lengths = [len(r.prompt_ids) + (0 if v is None else v.shape[0]) for r, v in zip(requests, virtual)]
        for r in requests:
            self.check(r)
        start = time.perf_counter()
        rows = [_Row(r, self.tokenizer, self.stop_ids) for r in requests]
        width = max(lengths)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, n) in enumerate(zip(requests, lengths)):
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, width - n :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # virtual tokens at 0..p-1, the prompt after them
        cache = DynamicCache(config=self.model.config)
        active = list(range(len(rows)))
        embeds = None
        if any(v is not None for v in virtual):  # prompt tuning: its embeddings just before the row's prompt
            embeds = self.model.get_input_embeddings()(ids)
            for i, (r, v) in enumerate(zip(requests, virtual)):
                if v is not None:
                    end = width - len(r.prompt_ids)
                    embeds[i, end - v.shape[0] : end] = v.to(embeds.dtype)
        with routed_tokens(self.moe, mask.bool() if self.moe else None):  # the prefill's left padding
            logits = self._forward(ids, mask, positions, cache, [requests[i].adapter for i in active], embeds=embeds)
        last_pos = positions[:, -1]
        while True:
            usable = usable_scores(logits).tolist()
            tokens = self._choose(logits, [rows[i] for i in active], usable)
            for i, t, ok in zip(active, tokens, usable):
                if ok:
                    rows[i].push(t)
                else:  # this row alone fails (e.g. a bf16 base whose scores overflowed); the others go on
                    rows[i].fail(NonFiniteScores("the model's next-token scores are NaN or infinite"))
            keep = [k for k, i in enumerate(active) if rows[i].finish is None]
            for i in active:
                row = rows[i]
                if row.finish not in (None, "error") and row.req.on_finish is not None:
                    row.req.on_finish(row.result())
            self.stats["tokens"] += len(active)
            if not keep:
                break
            nxt = torch.tensor(tokens, dtype=torch.long, device=self.device)
            if len(keep) < len(active):
                sel = torch.tensor(keep, dtype=torch.long, device=self.device)
                cache.batch_select_indices(sel)
                mask, last_pos, nxt = mask[sel], last_pos[sel], nxt[sel]
                active = [active[k] for k in keep]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            last_pos = last_pos + 1
            logits = self._forward(nxt[:, None], mask, last_pos[:, None], cache, [requests[i].adapter for i in active])
        self.stats["seconds"] += time.perf_counter() - start
        return [row.result() for row in rows]

    def _forward(self, ids, mask, positions, cache, adapters: list[str | None], embeds=None) -> torch.Tensor:
        self.stats["steps"] += 1
        inputs = {"input_ids": ids} if embeds is None else {"inputs_embeds": embeds}
        with self.adapters.route(adapters):
            out = self.model(
                **inputs,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **cache_kwargs(self.model, cache),
            )
        return out.logits[:, -1, :]

    def _choose(self, logits: torch.Tensor, rows: list[_Row], usable: list[bool]) -> list[int]:
        """Greedy rows from one argmax; sampled rows on the CPU with their own generator (same draw on any device).
        A row whose scores are not finite gets a placeholder (`generate` fails it) instead of a sampler error
        that failed every row of the batch."""
        greedy = logits.argmax(dim=-1).tolist()
        return [
            greedy[k] if row.greedy or not usable[k] else sample_next(logits[k].float().cpu(), row.req.params, row.gen)
            for k, row in enumerate(rows)
        ]
