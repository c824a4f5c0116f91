"""Text of generated tokens as they continue a prompt.

SentencePiece decoders (Llama 2, Mistral: a Metaspace decoder) drop the leading space of the first token they
decode, so decoding a continuation's tokens alone turns "brown" + " fox" into "brownfox", and a stop string or
an indented line that begins the continuation loses its first space. Decoding them behind a few prompt tokens and
cutting those off gives the text the model wrote (as vLLM's incremental detokenizer does with its prefix offset).
"""

from __future__ import annotations

from typing import Any, Sequence

CONTEXT_TOKENS = 4  # enough to hold a word boundary; more only costs decoding


class ContinuationDecoder:
    """The text a continuation adds after one prompt; the prompt's tail is decoded once (the server decodes a
    row's continuation again after every token). decode's keyword arguments (skip_special_tokens) apply to both."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], **decode_kwargs: Any) -> None:
        self.tokenizer, self.kwargs = tokenizer, decode_kwargs
        self.tail = list(prompt_ids[-CONTEXT_TOKENS:])
        self.before = tokenizer.decode(self.tail, **decode_kwargs) if self.tail else ""

    def __call__(self, ids: Sequence[int]) -> str:
        """Decoded alone where the prompt's tail does not decode to a prefix of the whole (a character split across
        the boundary), or where there is no prompt."""
        if self.tail and not self.before.endswith("\ufffd"):
            whole = self.tokenizer.decode(self.tail + list(ids), **self.kwargs)
            if whole.startswith(self.before):
                return whole[len(self.before) :]
        return self.tokenizer.decode(list(ids), **self.kwargs)


def continuation_text(tokenizer, prompt_ids: Sequence[int], ids: Sequence[int], **decode_kwargs: Any) -> str:
    """The text `ids` add after `prompt_ids` (see ContinuationDecoder)."""
    return ContinuationDecoder(tokenizer, prompt_ids, **decode_kwargs)(ids)
