"""Text of generated tokens as they continue a prompt.

SentencePiece decoders (Llama 2, Mistral: a Metaspace decoder) drop the leading space of the first token they
decode, so decoding a continuation's tokens alone turns "brown" + " fox" into "brownfox", and a stop string or
an indented line that begins the continuation loses its first space. Decoding them behind a few prompt tokens and
cutting those off gives the text the model wrote (as vLLM's incremental detokenizer does with its prefix offset).
"""

from __future__ import annotations

from typing import Sequence

CONTEXT_TOKENS = 4  # enough to hold a word boundary; more only costs decoding


def continuation_text(tokenizer, prompt_ids: Sequence[int], ids: Sequence[int], **decode_kwargs) -> str:
    """The text `ids` add after `prompt_ids` (decode's keyword arguments, e.g. skip_special_tokens, apply to both);
    decoded alone where the prompt's tail does not decode to a prefix of the whole (a character split across the
    boundary)."""
    tail = list(prompt_ids[-CONTEXT_TOKENS:])
    if not tail:
        return tokenizer.decode(list(ids), **decode_kwargs)
    before = tokenizer.decode(tail, **decode_kwargs)
    whole = tokenizer.decode(tail + list(ids), **decode_kwargs)
    if whole.startswith(before) and not before.endswith("\ufffd"):
        return whole[len(before) :]
    return tokenizer.decode(list(ids), **decode_kwargs)
