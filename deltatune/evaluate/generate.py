"""Batched generation for scoring: left padding, stop at end of sequence (or a stop string).

Prompts are sorted by length so that each batch pads little; results come back in input order.
Greedy by default; sampling is seeded so a scored run can be repeated, and each row draws from its own generator,
seeded from the seed, the prompt's tokens and how many times that prompt came before in the list: a prompt
samples the same text alone, in any batch and at any batch size (repeats of a prompt still differ).
A row stops as soon as its text holds a stop string (as lm-eval's `until` does), so a base model that runs on into
another few-shot example does not generate to `max_new_tokens`; the text is cut at the stop string either way.
"""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, StoppingCriteria, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from deltatune.detokenize import continuation_text
from deltatune.errors import UserError
from deltatune.evaluate.choice import keeps_logits, left_padded
from deltatune.upcycle.moe import routes_across_rows

# Temperatures below this decode greedily, as vLLM does: logits divided by 1e-45 overflow to inf and the
# sampler's probabilities to NaN (a server's whole batch failed; `generate` answered garbage).
GREEDY_BELOW = 1e-5


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()  # cut the text at the first of these (few-shot "Question:" etc.)
    # stop strings count only outside a ``` block: HumanEval's "\ndef " cut a chat model's fenced answer to "```python"
    stop_outside_fences: bool = False


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """eos plus the chat end-of-turn token when the tokenizer has one (ChatML's <|im_end|>), and, given the model,
    the end-of-sequence ids of its generation config (Gemma's <end_of_turn> is only there)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for special in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(special) if special in tokenizer.get_vocab() else None
        if tid is not None:
            ids.add(tid)
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([own] if isinstance(own, int) else [int(t) for t in own or ()])
    return sorted(ids)


def stop_position(text: str, stop: tuple[str, ...], outside_fences: bool = False) -> int | None:
    """Where the first stop string starts in `text`, or None. With `outside_fences`, an occurrence inside an
    open ``` block (an odd number of fences before it) does not count."""
    best = None
    for s in stop:
        if not s:
            continue
        i = text.find(s)
        while i >= 0 and outside_fences and text.count("```", 0, i) % 2:
            i = text.find(s, i + 1)
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def cut_at_stop(text: str, stop: tuple[str, ...], outside_fences: bool = False) -> str:
    i = stop_position(text, stop, outside_fences)
    return text if i is None else text[:i]


class StopStringsCriterion(StoppingCriteria):
    """Stop each row once its generated text contains a stop string.

    Only the last tokens are decoded: a stop string of b UTF-8 bytes spans at most b tokens (every token of a
    byte-level or byte-fallback vocabulary decodes to at least one byte), plus one on each side.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...], prompt_width: int, outside_fences: bool = False) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.prompt_width = prompt_width
        self.window = max(len(s.encode("utf-8")) for s in self.stop) + 2
        self.outside_fences = outside_fences  # then the whole continuation is decoded: fences opened long before count

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        start = self.prompt_width if self.outside_fences else max(self.prompt_width, input_ids.shape[1] - self.window)
        texts = self.tokenizer.batch_decode(input_ids[:, start:].tolist(), skip_special_tokens=True)
        hits = [stop_position(t, self.stop, self.outside_fences) is not None for t in texts]
        return torch.tensor(hits, device=input_ids.device)


def row_seed(seed: int, ids: list[int], repeat: int) -> int:
    """The seed of one row's sampling generator: from the run's seed, the prompt's tokens and the number of earlier
    copies of the same prompt, and nothing else (not its batch, not its place in the list)."""
    digest = hashlib.blake2b(f"{seed}|{repeat}|{ids}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class RowSampler(LogitsProcessor):
    """Sampling as greedy decoding over Gumbel-perturbed logits (the Gumbel-max trick: the argmax of
    `logits + Gumbel noise` is a draw from softmax(logits)), with the noise of each row from its own generator, so
    a row's draws do not depend on the other rows of its batch. Runs last, after temperature and top-k/top-p."""

    def __init__(self, seeds: list[int], device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        vocab = scores.shape[-1]
        uniform = torch.stack(
            [torch.rand(vocab, generator=g, device=scores.device) for g in self.generators]
        )  # float32 (no float64 on every device); rand < 1, and 0 is clamped away
        gumbel = -torch.log(-torch.log(uniform.clamp_(min=torch.finfo(torch.float32).tiny)))
        return scores.float() + gumbel


def _sampling_processors(model, config: GenerationConfig, seeds: list[int], device) -> list[LogitsProcessor]:
    """What `generate(do_sample=True)` applies (temperature, the model's top-k, else transformers' default 50, and
    top-p), then the per-row draw."""
    processors: list[LogitsProcessor] = []
    if config.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(config.temperature))
    top_k = getattr(getattr(model, "generation_config", None), "top_k", None)
    top_k = 50 if top_k is None else top_k
    if top_k:
        processors.append(TopKLogitsWarper(top_k=top_k))
    if config.top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=config.top_p))
    processors.append(RowSampler(seeds, device))
    return processors


def truncation_warning(i: int, n: int, length: int, keep: int, context: int, config: GenerationConfig) -> str:
    """One line: which prompt lost how many of its first tokens, and why."""
    which = f"prompt {i + 1} of {n}" if n > 1 else "the prompt"
    return (
        f"warning: {which} is {length} tokens, more than the model's context of {context} minus "
        f"max_new_tokens {config.max_new_tokens}: its first {length - keep} tokens were dropped, the last {keep} kept"
    )


@dataclass
class Generation:
    """A continuation, and whether it ran to `max_new_tokens` with no end of sequence or stop string (cut
    short: OpenAI's `finish_reason == "length"`, which Self-Instruct's filters drop)."""

    text: str
    hit_limit: bool


def generate(
    model,
    tokenizer,
    prompts: list[str],
    config: GenerationConfig | None = None,
    batch_size: int = 8,
    add_special_tokens: bool = False,
    progress: bool = True,
    warn_truncated: bool = False,
) -> list[str]:
    """Continuations of `prompts` (decoded without special tokens), in input order."""
    return [
        g.text
        for g in generate_detailed(
            model, tokenizer, prompts, config, batch_size, add_special_tokens, progress, warn_truncated
        )
    ]


@torch.no_grad()
def generate_detailed(
    model,
    tokenizer,
    prompts: list[str],
    config: GenerationConfig | None = None,
    batch_size: int = 8,
    add_special_tokens: bool = False,
    progress: bool = True,
    warn_truncated: bool = False,
) -> list[Generation]:
    """`generate`, with each continuation's `hit_limit`. `warn_truncated`: say on stderr, one line a prompt, when
    an over-long prompt's start is dropped (transformers would read it whole; `deltatune generate` says so)."""
    config = config or GenerationConfig()
    if config.do_sample and not 0 < config.temperature < math.inf:  # transformers' ValueError, after loading
        raise UserError(
            f"sampling needs a temperature above 0, got {config.temperature} (greedy: do_sample=False)",
            field="temperature",
        )
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:  # alone it would crash in the model, in a batch it would attend to nothing
            raise UserError(f"prompt {i + 1} of {len(prompts)} is empty (no tokens to continue)", field="prompt")
    from deltatune.methods.virtual_tokens import has_virtual_tokens, virtual_positions
    from deltatune.train.packed_attention import sliding_window_of

    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    virtual = virtual_positions(model)  # prompt/prefix tuning's positions before the prompt take context too
    if context and config.max_new_tokens + virtual >= context:  # no prompt token would fit before the new ones
        taken = f" and {virtual} virtual tokens leave" if virtual else " leaves"
        raise UserError(
            f"max_new_tokens {config.max_new_tokens}{taken} no room for the prompt in the model's context of "
            f"{context} tokens",
            field="max-new-tokens",
        )
    if context:  # keep the end of an over-long prompt (the question), drop the start (early shots)
        keep = max(1, context - config.max_new_tokens - virtual)
        if warn_truncated:
            for i, ids in enumerate(encoded):
                if len(ids) > keep:
                    print(truncation_warning(i, len(prompts), len(ids), keep, context, config), file=sys.stderr)
        encoded = [ids[-keep:] for ids in encoded]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    if routes_across_rows(model):  # expert choice: the other rows and their padding changed a row's text
        batch_size = 1
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if has_virtual_tokens(model) and sliding_window_of(model)[1]:
        # every layer slides (Mistral, Phi3): transformers' window counts cache slots, so a padded row's virtual
        # tokens left the window as many tokens early as the row had padding; prompts of one length need none
        by_length: dict[int, list[int]] = {}
        for i in order:
            by_length.setdefault(len(encoded[i]), []).append(i)
        batches = [rows[s : s + batch_size] for rows in by_length.values() for s in range(0, len(rows), batch_size)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = stop_token_ids(tokenizer, model)
    device = next(model.parameters()).device
    outputs: list[Generation] = [Generation("", False)] * len(prompts)
    seeds: list[int] = []
    if config.do_sample:
        seen: dict[tuple[int, ...], int] = {}
        for ids in encoded:
            repeat = seen.get(tuple(ids), 0)
            seen[tuple(ids)] = repeat + 1
            seeds.append(row_seed(config.seed, ids, repeat))
    bar = tqdm(total=len(prompts), desc="generate", unit="ex", disable=not progress or len(prompts) < 2)
    for idx in batches:
        input_ids, attention = left_padded([encoded[i] for i in idx], pad_id)
        width = input_ids.shape[1]
        kwargs = dict(max_new_tokens=config.max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=eos)
        kwargs.update(temperature=None, top_p=None, top_k=None)  # sampling: our processors, then the argmax
        if keeps_logits(model):  # the LM head at the last position only, as generate's own `1` would, but
            # as an index: the slice `1` of a prompt batch is not contiguous, and torch's matmul then expands
            # the head's weight once per row (GSM8K, 40 prompts: 59 s -> 50 s, the same tokens)
            kwargs["logits_to_keep"] = torch.tensor([-1])  # a CPU index selects on any device
        if config.do_sample:
            kwargs["logits_processor"] = _sampling_processors(model, config, [seeds[i] for i in idx], device)
        if any(config.stop):
            kwargs["stopping_criteria"] = [
                StopStringsCriterion(tokenizer, config.stop, width, config.stop_outside_fences)
            ]
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
        new_tokens = out[:, width:]
        for row, i in enumerate(idx):
            ids = new_tokens[row].tolist()
            # the text ends before the end-of-sequence token, special in the tokenizer or not (then pad follows)
            ended = next((k for k, t in enumerate(ids) if t in eos), None)
            text = continuation_text(
                tokenizer, encoded[i], ids if ended is None else ids[:ended], skip_special_tokens=True
            )
            cut = cut_at_stop(text, config.stop, config.stop_outside_fences)
            ran_out = new_tokens.shape[1] >= config.max_new_tokens and ended is None
            outputs[i] = Generation(cut, ran_out and cut == text)
        bar.update(len(idx))
    bar.close()
    return outputs
