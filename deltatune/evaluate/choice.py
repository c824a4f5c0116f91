"""Multiple choice by log-likelihood: score every option's text as a continuation of the prompt.

For each (context, option) pair: log P(option tokens | context) summed over the option's tokens.
Three predictions come from the same numbers:
- `sum`:   argmax of the raw sum (favours short options);
- `token`: argmax of the sum divided by the option's token count;
- `char`:  argmax of the sum divided by the option's character count (lm-eval's `acc_norm`,
           independent of the tokenizer) -- the headline accuracy of a choice task.
Each question's context goes through the model once (`shared_context`, the default where the model
allows it): a batch of contexts, left-padded, fills a key/value cache; each option then runs over its
question's cache, so a 4-option question costs one context forward and four option-sized ones instead of
four full ones (learn-forget's MMLU on the 135M model in bf16: 1.93x, docs/evaluation.md). Models with
virtual tokens (prompt, prefix tuning), or without a cache or `logits_to_keep`, score the pairs as whole
rows: all pairs of many questions go through one padded forward per batch, longest first. Either way the
LM head runs only at the positions that predict an option token (`logits_to_keep`): at a 49k vocabulary
the full logits of a batch are the largest tensor of the forward and most of them were thrown away.
Tokenisation follows lm-eval: encode context+option, and the option's tokens are those past the
context's own encoding, so a merge across the boundary is handled the way the model saw it (the context
is the context's own encoding in both cases, so every option of a question shares it).
One difference, kept on purpose: lm-eval's `_encode_pair` first moves a context's trailing whitespace into the
continuation. deltatune's plain style ends its context in "Answer:" and puts the space before the option, so
there the two agree token for token; but the chat template's context ends in "<|im_start|>assistant\n" (and
Alpaca's in "### Response:\n"), and there lm-eval would score "\n" + option where deltatune scores the option
after the template's own newline. Every option of a question shares that newline's log-probability, so acc_sum
ranks the same; acc and acc_token divide it by each option's length and can differ (0 of 60 anatomy
predictions changed on SmolLM2-135M-Instruct; up to 6 nats on the random tiny model).
"""

from __future__ import annotations

import copy
import inspect
import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from deltatune.kv_cache import cache_kwargs, output_cache, takes_cache
from deltatune.methods.virtual_tokens import prepended_tokens
from deltatune.upcycle.moe import moe_blocks, routed_tokens, routes_across_rows

NORMALISATIONS = ("char", "token", "sum")


class OptionError(ValueError):
    """An option that cannot be scored (no tokens, or longer than the model's context): `question` and `option`
    index it, so the caller can name the item's file and line."""

    def __init__(self, question: int, option: int, problem: str) -> None:
        super().__init__(f"option {option} of question {question} {problem}")
        self.question, self.option, self.problem = question, option, problem


def model_max_length(model, max_length: int | None = None) -> int:
    """The longest row `score_options` scores: `max_length`, else the model's position count."""
    return max_length or getattr(model.config, "max_position_embeddings", None) or 10**9


def option_problem(option_ids: list[int], text: str | None, max_length: int) -> str | None:
    """Why an option's tokens cannot be scored, or None: none at all (or, given its `text`, an option that is only
    whitespace), or too many to leave a question token."""
    if not option_ids or (text is not None and not text.strip()):
        return f"encodes to no tokens of its own: {text or ''!r}"
    if len(option_ids) >= max_length:
        return (
            f"has {len(option_ids)} tokens: it does not fit the model's context of {max_length} with a token of its "
            "question before it"
        )
    return None


@dataclass
class OptionScore:
    logprob: float  # sum of log-probabilities of the option's tokens
    n_tokens: int
    n_chars: int

    def value(self, norm: str) -> float:
        if norm == "sum":
            return self.logprob
        if norm == "token":
            return self.logprob / max(self.n_tokens, 1)
        if norm == "char":
            return self.logprob / max(self.n_chars, 1)
        raise ValueError(f"unknown normalisation {norm!r}")


def split_encode(
    tokenizer, context: str, continuation: str, add_special_tokens: bool = False
) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) whose concatenation encodes context+continuation. Where the context's own
    tokens start the joint encoding (the usual case: "Answer:" + " A") this is lm-eval's `_encode_pair` exactly.
    Where they do not (a token spans the boundary), lm-eval splits the joint encoding at the context's length and
    moves a context's trailing whitespace into the continuation, which drops "\n" from a prompt ending ":\n" under
    Qwen2/Llama-3 pre-tokenizers ("### Response:Paris") and misreads a tokenizer that appends EOS: deltatune
    keeps the context as trained and encodes the continuation apart (docs/evaluation.md)."""
    whole = tokenizer(context + continuation, add_special_tokens=add_special_tokens)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=add_special_tokens)["input_ids"]
    if whole[: len(ctx)] != ctx:  # boundary merge changed the context's tokens: encode apart
        return ctx, tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx) :]


def keeps_logits(model) -> bool:
    """Whether the causal LM's forward can return logits at chosen positions only."""
    return "logits_to_keep" in inspect.signature(type(model).forward).parameters


def scored_positions(rows: list[tuple[list[int], int]]) -> list[int]:
    """Sorted positions whose logits predict an option token in any row: t = ctx_len-1 .. len(ids)-2."""
    return sorted({t for ids, ctx_len in rows for t in range(ctx_len - 1, len(ids) - 1)})


@torch.no_grad()
def score_options(
    model,
    tokenizer,
    contexts: list[str],
    options: list[list[str]],
    batch_size: int = 16,
    max_length: int | None = None,
    add_special_tokens: bool = False,
    progress: bool = True,
    all_logits: bool = False,
    shared_context: bool | None = None,
    char_counts: list[list[int]] | None = None,
) -> list[list[OptionScore]]:
    """Log-likelihood of each option of each question; `options[i]` are continuations of `contexts[i]`.

    `all_logits` computes the head at every position (the path for a model whose forward lacks
    `logits_to_keep`; benchmarks/eval_speed.py times both). `shared_context` runs each context once and
    its options over its cache (None: unless `all_logits`; `batch_size` then counts questions) where the model
    allows it (`can_share_context`) and every row fits in its context; whole rows otherwise. `char_counts[i][j]`:
    the character count that `char` normalisation divides by, lm-eval's len(choice) of the option as written
    (without the delimiter before it); default: the continuation's length without surrounding spaces."""
    pairs: list[tuple[int, int, list[int], list[int], int]] = []
    for q, (ctx, opts) in enumerate(zip(contexts, options)):
        for o, text in enumerate(opts):
            c_ids, o_ids = split_encode(tokenizer, ctx, text, add_special_tokens)
            empty = option_problem(o_ids, text, max_length=sys.maxsize)  # the length is checked below
            if empty:
                raise OptionError(q, o, empty)
            if not c_ids:
                raise ValueError(f"the context of question {q} encodes to no tokens: nothing predicts the option")
            n_chars = char_counts[q][o] if char_counts is not None else (len(text.strip()) or len(text))
            pairs.append((q, o, c_ids, o_ids, n_chars))
    max_length = model_max_length(model, max_length)
    for q, o, _, o_ids, _ in pairs:  # at least one context token must stay to predict the option's first token
        problem = option_problem(o_ids, None, max_length)
        if problem:
            raise OptionError(q, o, problem)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    fits = all(len(c_ids) + len(o_ids) <= max_length for _, _, c_ids, o_ids, _ in pairs)
    if shared_context is None:
        shared_context = not all_logits
    if routes_across_rows(model):  # expert choice: a row's scores moved with its batch and the padding there
        batch_size, shared_context = 1, False
    # a row past the context length keeps its end, which whole rows do; virtual tokens need whole rows
    if shared_context and fits and can_share_context(model):
        shared = _score_over_shared_contexts(model, pairs, options, batch_size, pad_id, device, progress)
        if shared is not None:
            return shared
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][2]) + len(pairs[i][3])))
    results: list[list[OptionScore | None]] = [[None] * len(o) for o in options]
    keep_subset = not all_logits and keeps_logits(model)
    moe = [b for _, b in moe_blocks(model)]  # upcycled models route the real tokens only
    virtual = prepended_tokens(model)  # ... and prompt tuning's virtual ones
    bar = tqdm(total=len(pairs), desc="choices", unit="opt", disable=not progress or len(pairs) < 2)
    for start in range(0, len(order), batch_size):
        batch = [pairs[i] for i in order[start : start + batch_size]]
        rows = []
        for _, _, c_ids, o_ids, _ in batch:
            # the option's last token is a target only, never an input (as lm-eval feeds it): a context too long
            # for the window keeps max_length tokens before it, dropping its start
            ids = (c_ids + o_ids)[-(max_length + 1) :]
            rows.append((ids, len(ids) - len(o_ids)))
        width = max(len(ids) - 1 for ids, _ in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, _) in enumerate(rows):
            input_ids[r, : len(ids) - 1] = torch.tensor(ids[:-1])
            attention[r, : len(ids) - 1] = 1
        kwargs = {}
        column = list(range(width))  # position -> column of the logits tensor
        if keep_subset:
            keep = scored_positions(rows)
            kwargs["logits_to_keep"] = torch.tensor(keep, device=device)
            for j, t in enumerate(keep):
                column[t] = j
        with routed_tokens(moe, attention.bool().to(device), virtual):
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs).logits
        for r, ((q, o, _, o_ids, n_chars), (ids, ctx_len)) in enumerate(zip(batch, rows)):
            # logits at position t predict token t+1: the option's tokens are ids[ctx_len:]
            cols = [column[t] for t in range(ctx_len - 1, len(ids) - 1)]
            logp = torch.log_softmax(_at_least_fp32(logits[r, torch.tensor(cols, device=logits.device)]), dim=-1)
            target = torch.tensor(ids[ctx_len:], device=logp.device)
            total = logp.gather(1, target[:, None]).sum().item()
            results[q][o] = OptionScore(total, len(o_ids), n_chars)
        bar.update(len(batch))
    bar.close()
    return results  # type: ignore[return-value]


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every row ending at the last column, as generation needs."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, width - len(ids) :] = torch.tensor(ids)
        attention[r, width - len(ids) :] = 1
    return input_ids, attention


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Never a log-softmax in half precision (float64 stays float64)."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def can_share_context(model) -> bool:
    """Whether options can run over their context's cache: the forward keeps chosen logits and takes a cache,
    and no virtual tokens stand before each sequence (prompt and prefix tuning bring their own)."""
    from deltatune.methods.virtual_tokens import has_virtual_tokens

    return keeps_logits(model) and takes_cache(model) and not has_virtual_tokens(model)


def _score_over_shared_contexts(
    model, pairs, options, batch_size, pad_id, device, progress
) -> list[list[OptionScore]] | None:
    """`score_options` with each question's context run once, longest first, `batch_size` questions at a time.

    The contexts are left-padded with explicit positions, so every context ends at the last column: that
    column's logits predict each option's first token, and the options (right-padded) continue from there.
    Option tokens past the first are scored from forwards over the questions' cache, one row per option.
    None if the model returned no cache it can select rows of (gradient checkpointing in train mode turns
    the cache off): the caller scores whole rows instead.
    """
    by_question: dict[int, list[tuple[int, list[int], int]]] = {}
    context_ids: dict[int, list[int]] = {}
    for q, o, c_ids, o_ids, n_chars in pairs:
        by_question.setdefault(q, []).append((o, o_ids, n_chars))
        context_ids[q] = c_ids
    order = sorted(by_question, key=lambda q: -len(context_ids[q]))
    results: list[list[OptionScore | None]] = [[None] * len(o) for o in options]
    bar = tqdm(total=len(pairs), desc="choices", unit="opt", disable=not progress or len(pairs) < 2)
    for start in range(0, len(order), batch_size):
        questions = order[start : start + batch_size]
        input_ids, attention = left_padded([context_ids[q] for q in questions], pad_id)
        width = input_ids.shape[1]
        positions = (attention.cumsum(-1) - 1).clamp_min(0)
        out = model(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            position_ids=positions.to(device),
            use_cache=True,
            # the last column as an index, not `1`: a slice of the last position is not contiguous, and
            # torch's matmul then expands the LM head's weight once per row (1.4 s a batch of 16 here); a
            # CPU index selects on any device
            logits_to_keep=torch.tensor([width - 1]),
        )
        context_cache = output_cache(model, out)
        if not hasattr(context_cache, "batch_select_indices"):
            bar.close()
            return None
        first = torch.log_softmax(_at_least_fp32(out.logits[:, -1]), dim=-1)  # predicts every option's first token
        rows = [(r, q, o, o_ids, n_chars) for r, q in enumerate(questions) for o, o_ids, n_chars in by_question[q]]
        for r, q, o, o_ids, n_chars in rows:
            results[q][o] = OptionScore(float(first[r, o_ids[0]]), len(o_ids), n_chars)
        # option tokens past the first, longest first in groups of the batch's size (options of one length
        # pad little), each group over its own copy of the questions' cache
        later = sorted((row for row in rows if len(row[3]) > 1), key=lambda row: -len(row[3]))
        for g in range(0, len(later), len(questions)):
            group = later[g : g + len(questions)]
            span = len(group[0][3]) - 1  # the last option token predicts nothing
            cache = copy.deepcopy(context_cache)
            row_of = torch.tensor([r for r, *_ in group])
            cache.batch_select_indices(row_of)  # CPU indices select on any device
            opt_ids = torch.full((len(group), span), pad_id, dtype=torch.long)
            opt_mask = torch.zeros((len(group), span), dtype=torch.long)
            for i, (*_, o_ids, _) in enumerate(group):
                opt_ids[i, : len(o_ids) - 1] = torch.tensor(o_ids[:-1])
                opt_mask[i, : len(o_ids) - 1] = 1
            logits = model(
                input_ids=opt_ids.to(device),
                attention_mask=torch.cat([attention[row_of], opt_mask], dim=1).to(device),
                position_ids=(attention.sum(-1)[row_of][:, None] + torch.arange(span)).to(device),
                use_cache=True,
                **cache_kwargs(model, cache),
            ).logits
            logp = torch.log_softmax(_at_least_fp32(logits), dim=-1)
            for i, (r, q, o, o_ids, n_chars) in enumerate(group):
                tail = logp[i, torch.arange(len(o_ids) - 1), torch.tensor(o_ids[1:])].sum()
                results[q][o] = OptionScore(results[q][o].logprob + float(tail), len(o_ids), n_chars)
        bar.update(len(rows))
    bar.close()
    return results  # type: ignore[return-value]


def predict(scores: list[OptionScore], norm: str = "char") -> int:
    values = [s.value(norm) for s in scores]
    return max(range(len(values)), key=values.__getitem__)


def choice_accuracies(all_scores: list[list[OptionScore]], answers: list[int]) -> dict[str, float]:
    """acc (char-normalised, the headline), acc_token, acc_sum."""
    out = {}
    for norm in NORMALISATIONS:
        hits = [predict(s, norm) == a for s, a in zip(all_scores, answers)]
        key = "acc" if norm == "char" else f"acc_{norm}"
        out[key] = sum(hits) / len(hits) if hits else float("nan")
    return out
