"""Tokenize examples so that every token knows the segment its characters came from.

The example's full text is tokenized once (so tokens are exactly what the model sees at
inference) and the fast tokenizer's offset mapping gives each token's character span; the
segment holding its last character gives the token's role and turn (a token that straddles a
boundary, like " 5" after a template ending in "[/INST]", is what the model generates there). No marker string is ever
re-tokenized on its own, so a template whose markers tokenize differently in context is still
tagged right. Tokenization is batched: the Rust tokenizer does the work in parallel.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any, Sequence

from deltatune.data.segments import Example, Role, TokenizedExample
from deltatune.errors import ConfigError


def adds_bos(tokenizer: Any) -> bool:
    """True when the tokenizer itself puts a BOS token in front of text (then so do we)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(without) and with_special[0] == bos


def tokenize_examples(examples: Sequence[Example], tokenizer: Any, *, keep_offsets: bool = False,
                      batch_size: int = 2048) -> list[TokenizedExample]:
    """Token ids, roles and turns for each example (weights are filled later by a loss policy).

    BOS, when the tokenizer adds one, is prepended as a `special` token (unless the template
    already wrote it). `keep_offsets` keeps each token's character span for previews.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("a fast (Rust) tokenizer is needed for offset mappings", field="--model")
    bos_id = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    bos_text = tokenizer.bos_token
    out: list[TokenizedExample] = []
    for lo in range(0, len(examples), batch_size):
        chunk = examples[lo:lo + batch_size]
        texts = [ex.text for ex in chunk]
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
        for ex, text, ids, offsets in zip(chunk, texts, enc["input_ids"], enc["offset_mapping"]):
            out.append(_tag(ex, text, ids, offsets, bos_id, bos_text, keep_offsets))
    return out


def _tag(ex: Example, text: str, ids: list[int], offsets: list[tuple[int, int]], bos_id: int | None,
         bos_text: str | None, keep_offsets: bool) -> TokenizedExample:
    starts, seg_roles, seg_turns = [], [], []
    pos = 0
    for seg in ex.segments:
        starts.append(pos)
        seg_roles.append(seg.role)
        seg_turns.append(seg.turn)
        pos += len(seg.text)
    roles: list[Role] = []
    turns: list[int] = []
    last = len(starts) - 1
    for start, end in offsets:
        # the character a token ends on decides: " 5" after a scaffold ending in "[/INST]" is response
        i = bisect_right(starts, end - 1 if end > start else start) - 1
        if i > last:
            i = last
        roles.append(seg_roles[i])
        turns.append(seg_turns[i])
    ids = list(ids)
    offs = [tuple(o) for o in offsets] if keep_offsets else None
    if bos_id is not None and not (bos_text and text.startswith(bos_text)):
        ids.insert(0, bos_id)
        roles.insert(0, Role.SPECIAL)
        turns.insert(0, 0)
        if offs is not None:
            offs.insert(0, (0, 0))
    tex = TokenizedExample(ids, roles, turns, source=ex.source)
    if keep_offsets:
        tex.text = text
        tex.offsets = offs
    return tex
