"""The shared vocabulary of the data path: segments tagged with roles.

An example is an ordered list of text segments. Every token later inherits the role of the
segment its characters came from, and a loss policy is a pure function from roles to weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Role(str, Enum):
    SYSTEM = "system"  # system prompt text
    TEMPLATE = "template"  # constant boilerplate ("Below is an instruction that ...")
    ROLE = "role"  # role markers and section headers ("### Response:", "<|im_start|>user\n")
    INSTRUCTION = "instruction"  # the user's instruction / user turn content
    INPUT = "input"  # Alpaca's optional input
    RESPONSE = "response"  # the assistant's answer, including its closing end-of-turn token
    CONTEXT = "context"  # an assistant message marked `"weight": 0` (OpenAI's format): context, not a target
    SPECIAL = "special"  # BOS / EOS / padding that belong to no text


@dataclass(frozen=True)
class Segment:
    role: Role
    text: str
    turn: int = 0  # index of the exchange this segment belongs to (multi-turn chat)


@dataclass
class Example:
    segments: list[Segment]
    source: str = ""  # "file:line" for error messages and previews
    meta: dict = field(default_factory=dict)
    # The tokenizer's own chat template rendered it, and decides alone whether a BOS starts it (as at inference,
    # where its text is encoded without special tokens); otherwise BOS is added as the tokenizer adds it to text.
    template_writes_bos: bool = False
    # Answers (message numbers) the template writes otherwise in the history than when they end the conversation,
    # as they did when generated: trained as written, they would teach answers without what the model writes
    # first (Qwen3 drops earlier turns' think blocks). Only policies that train the last turn alone can use them.
    answers_rendered_as_history: tuple[int, ...] = ()

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)


@dataclass
class TokenizedExample:
    """Token ids with, for each token, the role and turn of the segment it came from."""

    input_ids: list[int]
    roles: list[Role]
    turns: list[int]
    weights: list[float] | None = None  # filled by a loss policy; weight of token t as a target
    source: str = ""
    truncated: bool = False  # cut to max_len by prepare_dataset
    last_response_turn: int | None = None  # the turn of the last answer before truncation (set when cut)
    text: str = ""  # the rendered text, kept only for previews (keep_offsets=True)
    offsets: list[tuple[int, int]] | None = None  # each token's character span in `text`, for previews

    def __len__(self) -> int:
        return len(self.input_ids)
