"""Turn an item (and its few-shot examples) into the model's prompt text, in one of three styles.

- "chat":   the tokenizer's chat template; each shot is a user turn and an assistant turn
            (the default when the tokenizer has a template, as instruct models do);
- "alpaca": the Alpaca template without input ("### Instruction:" / "### Response:");
- "plain":  "Question: ...\\nAnswer: ..." blocks, for base models.
Each style also says what to put before an option or letter (a space after "Answer:") and where a
generation should stop if the model runs on into another example.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from deltatune.errors import UserError
from deltatune.evaluate.tasks import Item

STYLES = ("chat", "alpaca", "plain")
ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
# every Alpaca example starts with the header, so a model running on into another example writes it before
# "### Instruction:": cut there too, or the header stays in the answer (exact match 0, ROUGE-L 0.11 for "Paris")
ALPACA_STOP = (ALPACA_HEADER.split(".")[0], "### Instruction:")


@dataclass(frozen=True)
class PromptStyle:
    name: str
    continuation_prefix: str  # before an option's text or a letter
    stop: tuple[str, ...]  # cut generated text here
    carried: str | None = None  # chat: the training template the tokenizer carries (None: its own template)

    @property
    def label(self) -> str:
        """What results.json records: the style, and for chat which template rendered it."""
        return f"chat (training template {self.carried})" if self.carried else self.name


def default_style(tokenizer) -> str:
    """chat where the tokenizer has a chat template, else plain; also plain for a carried `raw` training template,
    which writes no cue for where an answer starts (eval's questions carry none of their own)."""
    from deltatune.data.templates import carried_template

    if carried_template(tokenizer) == "raw":
        return "plain"
    return "chat" if getattr(tokenizer, "chat_template", None) else "plain"


def style_info(name: str, tokenizer=None) -> PromptStyle:
    """The style `name`; for chat with a carried Alpaca template (see deltatune.data.templates), Alpaca's stops:
    a model running on into another example writes its header, which stayed in the answer."""
    if name == "chat":
        from deltatune.data.templates import carried_template

        carried = carried_template(tokenizer) if tokenizer is not None else None
        return PromptStyle("chat", "", ALPACA_STOP if carried == "alpaca" else (), carried)
    if name == "alpaca":
        return PromptStyle("alpaca", "", ALPACA_STOP)
    if name == "plain":
        return PromptStyle("plain", " ", ("Question:",))  # lm-eval's gsm8k `until`: also mid-line
    raise UserError(f"unknown prompt style '{name}'; choose one of: {', '.join(STYLES)}", field="prompt-style")


def render(tokenizer, style: str, shots: list[tuple[str, str]], question: str) -> str:
    """The full prompt: shots as (question, answer) pairs, then the question awaiting an answer."""
    if style == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                "prompt style 'chat' needs a tokenizer with a chat template; use --prompt-style plain",
                field="prompt-style",
            )
        messages = []
        for q, a in shots:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": question})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if style == "alpaca":
        blocks = [f"{ALPACA_HEADER}### Instruction:\n{q}\n\n### Response:\n{a}\n\n" for q, a in shots]
        return "".join(blocks) + f"{ALPACA_HEADER}### Instruction:\n{question}\n\n### Response:\n"
    if style == "plain":
        blocks = [f"Question: {q}\nAnswer: {a}\n\n" for q, a in shots]
        return "".join(blocks) + f"Question: {question}\nAnswer:"
    style_info(style)  # raises for an unknown name
    raise AssertionError


def letter_question(item: Item) -> str:
    """A multiple-choice question with lettered options, for letter-choice scoring."""
    lines = [item.prompt] + [f"{chr(65 + i)}. {opt}" for i, opt in enumerate(item.options or [])]
    return "\n".join(lines) + "\nAnswer with the letter of the correct option."


def pick_shots(pool: list[Item], k: int, seed: int, exclude: Item | None = None) -> list[Item]:
    """k examples drawn with a fixed seed; the same shots for every question, never the question itself."""
    if k <= 0:
        return []

    def same(p: Item) -> bool:  # the same object, the same record read twice, or the same question elsewhere
        if exclude is None:
            return False
        if p is exclude or (bool(p.source) and p.source == exclude.source):
            return True
        # a test file can repeat a question word for word (MMLU does): its twin would show the answer
        return p.prompt == exclude.prompt and p.options == exclude.options

    candidates = [p for p in pool if not same(p)]
    if len(candidates) < k:
        raise UserError(f"asked for {k} shots but only {len(candidates)} examples are available", field="shots")
    # k + 1 draws (the seeded shots of earlier versions); where duplicates of the item took their place, the rest
    # of the pool follows in a fixed order. A larger redraw (as before 2026-12-07) was another sample altogether, so
    # a question with twins got other shots than every other question.
    order = random.Random(seed).sample(range(len(pool)), min(len(pool), k + 1))
    chosen = [pool[i] for i in order if not same(pool[i])][:k]
    if len(chosen) < k:
        drawn = set(order)
        rest = [i for i in range(len(pool)) if i not in drawn]
        random.Random(seed + 1).shuffle(rest)
        chosen += [pool[i] for i in rest if not same(pool[i])][: k - len(chosen)]
    return chosen
