"""Tokenize examples so that every token knows the segment its characters came from.

The example's full text is tokenized once (so tokens are exactly what the model sees at
inference) and the fast tokenizer's offset mapping gives each token's character span; the
segment holding its last character gives the token's role and turn (a token that straddles a
boundary, like " 5" after a template ending in "[/INST]", is what the model generates there). No marker string is ever
re-tokenized on its own, so a template whose markers tokenize differently in context is still
tagged right. One exception: where an answer's first characters merge into a token that began in the prompt (a
byte-level "\n" + indentation), the text is tokenized apart at the answer's start, as inference tokenizes the
prompt alone. Tokenization is batched: the Rust tokenizer does the work in parallel.
"""

from __future__ import annotations

import json
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


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    keep_offsets: bool = False,
    batch_size: int = 2048,
) -> list[TokenizedExample]:
    """Token ids, roles and turns for each example (weights are filled later by a loss policy).

    BOS, when the tokenizer adds one, is prepended as a `special` token (unless the template
    already wrote it). An example the tokenizer's own chat template rendered (`template_writes_bos`) gets none:
    that template decides alone, as at inference, where generate and serve encode its text without special
    tokens (a BOS added here was a token the model never sees when it is used). Plain-text records get it as
    the tokenizer gives it to any text, whatever the template. `keep_offsets` keeps each token's character span
    for previews.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("a fast (Rust) tokenizer is needed for offset mappings", field="--model")
    tokenizer_bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    bos_text = tokenizer.bos_token
    backend = tokenizer.backend_tokenizer  # the Rust tokenizer: batched, parallel, offsets without Python dicts
    if backend.truncation is not None or backend.padding is not None:
        # A tokenizer.json may carry truncation or padding, which the transformers wrapper turns off
        # per call but the Rust tokenizer applies: text would be cut silently or pads appended.
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    out: list[TokenizedExample] = []
    continuation = None  # made when a first answer needs it
    for lo in range(0, len(examples), batch_size):
        chunk = examples[lo : lo + batch_size]
        texts = [ex.text for ex in chunk]
        for ex, text, enc in zip(chunk, texts, backend.encode_batch(texts, add_special_tokens=False)):
            bos_id = None if ex.template_writes_bos else tokenizer_bos
            cuts = _answers_merged_into_prompt(ex, enc)
            if cuts:
                continuation = continuation or continuation_tokenizer(backend)
                enc = _SplitEncoding(backend, continuation, text, cuts)
            out.append(_tag(ex, text, enc, bos_id, bos_text, keep_offsets))
    return out


def _answers_merged_into_prompt(ex: Example, enc: Any) -> list[int]:
    """Where an answer starts inside a token that began in the prompt before it: a byte-level tokenizer merges the
    generation prompt's final newline with an answer that opens with whitespace (indented code, a blank line) into
    one token. Tagged as the answer, that token left the trained context without the newline every inference
    prompt ends with, and its first target was a token the model never produces after that prompt."""
    cuts, pos = [], 0
    for before, seg in zip(ex.segments, ex.segments[1:]):
        pos += len(before.text)
        if seg.role is Role.RESPONSE and before.role is not Role.RESPONSE and seg.text:
            t = enc.char_to_token(pos)
            if t is not None and enc.token_to_chars(t)[0] < pos:
                cuts.append(pos)
    return cuts


def continuation_tokenizer(backend: Any) -> Any:
    """`backend` tokenizing text as the continuation of a text before it: without the word boundary a
    SentencePiece-style tokenizer puts in front of the text it starts ("\u2581", a Metaspace pre-tokenizer's
    `prepend_scheme` or a `Prepend` normalizer) or a byte-level one's `add_prefix_space`. An answer cut from its
    prompt is such a continuation: the model writes it after the prompt's tokens, and a space put before it
    would be trained as a character the record does not have. `backend` itself when it adds nothing."""
    from tokenizers import Tokenizer

    spec = json.loads(backend.to_str())
    changed = False

    def plain(component: dict | None) -> dict | None:
        nonlocal changed
        if component is None:
            return None
        kind = component.get("type")
        if kind == "Sequence":
            key = "normalizers" if "normalizers" in component else "pretokenizers"
            kept = [c for c in (plain(c) for c in component[key]) if c is not None]
            return {**component, key: kept}
        if kind == "Prepend":
            changed = True
            return None
        if kind == "Metaspace" and (
            component.get("prepend_scheme", "always") != "never" or component.get("add_prefix_space")
        ):
            changed = True
            return {
                **component,
                "prepend_scheme": "never",
                **({"add_prefix_space": False} if "add_prefix_space" in component else {}),
            }
        if kind == "ByteLevel" and component.get("add_prefix_space"):
            changed = True
            return {**component, "add_prefix_space": False}
        return component

    spec["normalizer"] = plain(spec.get("normalizer"))
    spec["pre_tokenizer"] = plain(spec.get("pre_tokenizer"))
    return Tokenizer.from_str(json.dumps(spec)) if changed else backend


class _SplitEncoding:
    """The encoding of `text` cut at `cuts`, each piece tokenized alone, as inference tokenizes a prompt and the
    model then writes the answer after it (the pieces after the first by `continuation`, which puts no word
    boundary before them); offsets stay those of the whole text."""

    def __init__(self, backend: Any, continuation: Any, text: str, cuts: list[int]) -> None:
        starts = [0, *cuts]
        pieces = [text[a:b] for a, b in zip(starts, [*cuts, len(text)])]
        encodings = [
            *backend.encode_batch(pieces[:1], add_special_tokens=False),
            *continuation.encode_batch(pieces[1:], add_special_tokens=False),
        ]
        self.ids: list[int] = []
        self.offsets: list[tuple[int, int]] = []
        for start, enc in zip(starts, encodings):
            self.ids += enc.ids
            self.offsets += [(a + start, b + start) for a, b in enc.offsets]
        self._ends = [b for _, b in self.offsets]

    def char_to_token(self, char: int) -> int | None:
        t = bisect_right(self._ends, char)
        return t if t < len(self.offsets) and self.offsets[t][0] <= char else None


def _segment_bounds(enc: Any, seg_starts: list[int]) -> list[int]:
    """Index of the first token of each segment after the first.

    A token belongs to the segment holding its last character (" 5" after a template ending in
    "[/INST]" is response); token ends rise with the index, so a segment starting at character c
    begins at the first token ending after c, which is the token containing c. The Rust encoding
    answers that directly; a character no token covers falls back to bisecting the token ends.
    """
    bounds, ends = [], None
    for st in seg_starts:
        t = enc.char_to_token(st)
        if t is None:
            if ends is None:
                ends = [e for _, e in enc.offsets]
            t = bisect_right(ends, st)
        bounds.append(t)
    return bounds


def _tag(
    ex: Example, text: str, enc: Any, bos_id: int | None, bos_text: str | None, keep_offsets: bool
) -> TokenizedExample:
    ids = enc.ids
    n = len(ids)
    seg_starts, pos = [], 0
    for seg in ex.segments[:-1]:
        pos += len(seg.text)
        seg_starts.append(pos)  # where each later segment starts
    bounds = _segment_bounds(enc, seg_starts)
    roles: list[Role] = []
    turns: list[int] = []
    prev = 0
    for seg, b in zip(ex.segments, bounds + [n]):
        if b > prev:
            roles += [seg.role] * (b - prev)
            turns += [seg.turn] * (b - prev)
            prev = b
    ids = list(ids)
    offs = [tuple(o) for o in enc.offsets] if keep_offsets else None
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
