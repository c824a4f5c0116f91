"""Templates: a conversation becomes an ordered list of role-tagged segments (an `Example`).

Three templates plus a raw one:
- "alpaca": the Stanford Alpaca prompt. The preamble ("Below is an instruction ...") and the blank
  lines between sections are `template`; the headers "### Instruction:\\n", "### Input:\\n",
  "### Response:\\n" are `role`; the response is followed by the tokenizer's EOS as `response`.
- "chatml": "<|im_start|>{role}\\n" is `role`; after a user or system message "<|im_end|>\\n" is
  `role`; after an assistant message "<|im_end|>" is `response` (it carries loss: the model must
  learn to stop) and the "\\n" after it is `role` (turn separator, never generated).
- "tokenizer": the tokenizer's own chat template (`apply_chat_template`). Each message part is
  rendered as a unique sentinel; locating the sentinels gives the scaffold between them, which is
  `role`, except the end-of-turn token right after an assistant message (`response`, with any
  whitespace before it, as Llama-2's ' ' + eos_token) and a leading
  BOS string (`special`, unless every turn opens with that same string, as in ChatML tokenizers
  whose BOS is "<|im_start|>"). A default system prompt that the template injects is scaffold, so `role`.
  Every example is re-rendered with its real text and compared, so a template that rewrites
  content (for example stripping it) is refused instead of being tagged wrongly.
- "raw": no scaffold at all: the parts back to back, EOS after each assistant message.
Plain-text records ignore the template: the text is `response` followed by the tokenizer's EOS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from deltatune.data.formats import Conversation, Message
from deltatune.data.segments import Example, Role, Segment
from deltatune.errors import ConfigError, DataError

TEMPLATES = ("auto", "alpaca", "chatml", "tokenizer", "raw")

ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_HEADERS = {"user": "### Instruction:\n", "input": "### Input:\n", "assistant": "### Response:\n"}
ALPACA_SEP = "\n\n"

# End-of-turn strings a chat template may emit after an assistant message.
END_OF_TURN_STRINGS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>")


class _Builder:
    """Collects segments in order (empty pieces are skipped; neighbours of one role may repeat)."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []
        self.answers_rendered_as_history: tuple[int, ...] = ()  # see TokenizerTemplate._generated_preambles

    def add(self, role: Role, text: str, turn: int) -> None:
        if text:
            self.segments.append(Segment(role, text, turn))


def _closing_role(message: Message) -> Role:
    """The role of the end-of-turn string after an assistant message: a target with its response, context
    after a message marked `"weight": 0` (the model is not taught to stop there either)."""
    return Role.CONTEXT if message.parts and message.parts[-1][0] is Role.CONTEXT else Role.RESPONSE


def _turns(messages: list[Message]) -> list[int]:
    """Exchange index of each message: it advances after every assistant message."""
    out, turn = [], 0
    for m in messages:
        out.append(turn)
        if m.role == "assistant":
            turn += 1
    return out


@dataclass
class Template:
    """Renders conversations for one tokenizer; `name` is what errors and previews show."""

    name: str
    eos: str  # the end-of-turn string that closes a response and carries loss
    text_eos: str = ""  # the tokenizer's EOS, closing a plain-text document ("": same as `eos`)
    writes_bos = False  # whether its rendering of a conversation decides the BOS (the tokenizer's chat template)
    first_text = "''"  # a Jinja expression: the text its chat template writes first (see `training_chat_template`)

    def render(self, conv: Conversation) -> Example:
        b = _Builder()
        if conv.kind == "text":  # the template is not used: BOS as the tokenizer gives it to any text
            b.add(Role.RESPONSE, conv.messages[0].content, 0)
            b.add(Role.RESPONSE, self.text_eos or self.eos, 0)
            return Example(b.segments, source=conv.source, meta=conv.meta)
        self._render(conv, b)
        return Example(
            b.segments,
            source=conv.source,
            meta=conv.meta,
            template_writes_bos=self.writes_bos,
            answers_rendered_as_history=b.answers_rendered_as_history,
        )

    def _render(self, conv: Conversation, b: _Builder) -> None:
        raise NotImplementedError

    def chat_template(self, bos: str = "") -> str | None:
        """This template as a Jinja chat template, for the tokenizer saved with the trained model or adapter:
        `apply_chat_template(messages, add_generation_prompt=True)` then renders the prompt that training
        rendered before an answer, so `generate`, `eval`, `serve` and other tools (vLLM, transformers'
        pipelines) prompt the model as it was trained. `bos`: the Jinja that writes the BOS training put in
        front (inference tokenizes a chat template's text without special tokens; see
        `training_chat_template`). None: the tokenizer's own template is the training template already."""
        return None


# Jinja pieces shared by the chat templates below (HF renders them with trim_blocks and lstrip_blocks).
_JINJA_ONLY_ROLES = (
    "{% if message['role'] not in [{roles}] %}"
    "{{ raise_exception('template {name} has no place for a ' + message['role'] + ' message') }}{% endif %}"
)


def _only_roles(name: str, roles: tuple[str, ...]) -> str:
    return _JINJA_ONLY_ROLES.replace("{roles}", ", ".join(f"'{r}'" for r in roles)).replace("{name}", name)


class AlpacaTemplate(Template):
    def _render(self, conv: Conversation, b: _Builder) -> None:
        msgs = conv.messages
        turns = _turns(msgs)
        has_input = any(r == Role.INPUT for m in msgs for r, _ in m.parts)
        start = 0
        if msgs[0].role == "system":
            b.add(Role.SYSTEM, msgs[0].content, 0)  # a system prompt replaces the constant preamble
            start = 1
        else:
            b.add(Role.TEMPLATE, ALPACA_PREAMBLE_INPUT if has_input else ALPACA_PREAMBLE, 0)
        for m, turn in zip(msgs[start:], turns[start:]):
            b.add(Role.TEMPLATE, ALPACA_SEP, turn)
            b.add(Role.ROLE, ALPACA_HEADERS[m.role], turn)
            for role, text in m.parts:
                if role == Role.TEMPLATE:  # the instruction/input separator becomes Alpaca's own section break
                    continue
                if role == Role.INPUT:
                    b.add(Role.TEMPLATE, ALPACA_SEP, turn)
                    b.add(Role.ROLE, ALPACA_HEADERS["input"], turn)
                b.add(role, text, turn)
            if m.role == "assistant":
                b.add(_closing_role(m), self.eos, turn)

    # a system message replaces the preamble; an empty one (training refuses them) does not
    first_text = (
        "(messages[0]['content'] if messages and messages[0]['role'] == 'system' and messages[0]['content'] "
        f"else {ALPACA_PREAMBLE!r})"
    )

    def chat_template(self, bos: str = "") -> str | None:
        """A leading system message replaces the preamble; a user message in two parts (instruction and input)
        cannot be told apart here, so inference writes the preamble without input."""
        return (
            bos
            + "{% set rest = messages[1:] if messages and messages[0]['role'] == 'system' else messages %}"
            + f"{{{{ {self.first_text} }}}}"
            + "{% for message in rest %}"
            + _only_roles("alpaca", ("user", "assistant"))
            + "{% if message['role'] == 'user' %}"
            + _jinja_text(ALPACA_SEP + ALPACA_HEADERS["user"])
            + "{% else %}"
            + _jinja_text(ALPACA_SEP + ALPACA_HEADERS["assistant"])
            + "{% endif %}{{ message['content'] }}"
            + "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
            + "{% if add_generation_prompt %}"
            + _jinja_text(ALPACA_SEP + ALPACA_HEADERS["assistant"])
            + "{% endif %}"
        )


def _jinja_text(text: str) -> str:
    """`text` as a Jinja expression (a string literal: its newlines escaped, never touched by trim_blocks)."""
    return "{{ " + repr(text) + " }}"


class ChatMLTemplate(Template):
    def _render(self, conv: Conversation, b: _Builder) -> None:
        for m, turn in zip(conv.messages, _turns(conv.messages)):
            b.add(Role.ROLE, f"<|im_start|>{m.role}\n", turn)
            for role, text in m.parts:
                b.add(role, text, turn)
            if m.role == "assistant":
                b.add(_closing_role(m), "<|im_end|>", turn)
                b.add(Role.ROLE, "\n", turn)
            else:
                b.add(Role.ROLE, "<|im_end|>\n", turn)

    first_text = "'<|im_start|>'"

    def chat_template(self, bos: str = "") -> str | None:
        return (
            bos
            + "{% for message in messages %}"
            + "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
            + "{% if add_generation_prompt %}"
            + _jinja_text("<|im_start|>assistant\n")
            + "{% endif %}"
        )


class RawTemplate(Template):
    def _render(self, conv: Conversation, b: _Builder) -> None:
        for m, turn in zip(conv.messages, _turns(conv.messages)):
            for role, text in m.parts:
                b.add(role, text, turn)
            if m.role == "assistant":
                b.add(_closing_role(m), self.eos, turn)

    first_text = "(messages[0]['content'] if messages else '')"

    def chat_template(self, bos: str = "") -> str | None:
        return (
            bos
            + "{% for message in messages %}{{ message['content'] }}"
            + "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
        )


class TokenizerTemplate(Template):
    """The tokenizer's own chat template, segmented by rendering sentinel contents."""

    SENTINEL = "XQDTSENT{}QX"
    writes_bos = True

    def __init__(self, name: str, eos: str, tokenizer: Any) -> None:
        super().__init__(name, eos)
        self.tokenizer = tokenizer
        self.bos = getattr(tokenizer, "bos_token", None)
        self._scaffolds: dict[tuple, tuple[list[str], dict[int, str]]] = {}

    def _apply(self, messages: list[dict], source: str, generation_prompt: bool = False) -> str:
        """Render with the tokenizer's template. A template that raises (Llama-2's and Mistral's do for roles
        that do not alternate) refuses this record: a DataError naming it, which --skip-bad can skip."""
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja raises its own errors for unsupported role orders
            raise DataError(
                f"the tokenizer's chat template failed: {exc} (--template tokenizer)", file=source or None
            ) from None

    def _scaffold(self, msgs: list[Message], source: str) -> tuple[list[str], dict[int, str], tuple[int, ...]]:
        """Scaffold pieces around the parts: scaffold[0] part0 scaffold[1] part1 ... scaffold[n]; the text the
        model writes before an answer (`_generated_preambles`), by the answer's first part; and the answers the
        template renders otherwise as history than as the conversation's last."""
        key = tuple((m.role, len(m.parts)) for m in msgs)
        if key in self._scaffolds:
            return self._scaffolds[key]
        k = 0
        sent_msgs, first_parts = [], []
        for m in msgs:
            content = "".join(self.SENTINEL.format(k + i) for i in range(len(m.parts)))
            first_parts.append(k)
            k += len(m.parts)
            sent_msgs.append({"role": m.role, "content": content})
        rendered = self._apply(sent_msgs, source)
        pieces, pos = [], 0
        for i in range(k):
            s = self.SENTINEL.format(i)
            at = rendered.find(s, pos)
            if at < 0 or rendered.count(s) != 1:  # this record's shape: its own error, which --skip-bad skips
                n = sum(1 for f in first_parts if f <= i)  # the message (1-based) this part belongs to
                raise DataError(
                    f"the tokenizer's chat template cannot be segmented: message {n} ({sent_msgs[n - 1]['role']}) "
                    "does not appear exactly once, in order, in its output (the template drops, repeats or moves "
                    "it; Mistral's moves a system message into the last user turn); use --template chatml or alpaca",
                    file=source or None,
                )
            pieces.append(rendered[pos:at])
            pos = at + len(s)
        pieces.append(rendered[pos:])
        preambles, as_history = self._generated_preambles(sent_msgs, first_parts, rendered, source)
        self._scaffolds[key] = (pieces, preambles, as_history)
        return self._scaffolds[key]

    def _generated_preambles(
        self, sent_msgs: list[dict], first_parts: list[int], rendered: str, source: str
    ) -> tuple[dict[int, str], tuple[int, ...]]:
        """What the model must write itself before each answer. At inference the prompt is the conversation so
        far with the generation prompt (`add_generation_prompt`); whatever the template puts between that and the
        answer (Qwen3's empty `<think>` block before the last answer, a space after "Bot:") is generated, so
        it becomes part of the answer's text here. A template whose generation prompt is not how it begins the
        answer would train other prompts than inference shows: refused. Also returns the answers (message
        numbers, 1-based) whose start the template writes otherwise when they end the conversation, as when they
        were generated, than in the history after them (Qwen3 drops the think block from earlier turns)."""
        preambles: dict[int, str] = {}
        as_history: list[int] = []
        last_answer = max((j for j, m in enumerate(sent_msgs) if m["role"] == "assistant"), default=-1)
        for j, (message, first_part) in enumerate(zip(sent_msgs, first_parts)):
            if message["role"] == "assistant" and j > 0:
                at = rendered.find(self.SENTINEL.format(first_part))  # where the answer's text starts
                prompt = self._apply(sent_msgs[:j], source, generation_prompt=True)
                if not rendered.startswith(prompt) or len(prompt) > at:
                    raise DataError(
                        f"the tokenizer's chat template writes the start of message {j + 1} (an answer) otherwise "
                        "than its generation prompt (add_generation_prompt), so training would show other prompts "
                        "than inference; use --template chatml or alpaca",
                        file=source or None,
                    )
                if at > len(prompt):
                    preambles[first_part] = rendered[len(prompt) : at]
                if j != last_answer:  # as history: does it start as it did when it ended the conversation?
                    alone = self._apply(sent_msgs[: j + 1], source)
                    began = alone[len(prompt) : alone.find(self.SENTINEL.format(first_part))]
                    if alone.startswith(prompt) and began != rendered[len(prompt) : at]:
                        as_history.append(j + 1)
        return preambles, tuple(as_history)

    def _render(self, conv: Conversation, b: _Builder) -> None:
        msgs = conv.messages
        scaffold, preambles, as_history = self._scaffold(msgs, conv.source)
        b.answers_rendered_as_history = as_history
        real = self._apply([{"role": m.role, "content": m.content} for m in msgs], conv.source)
        parts = [(m, turn, role, text) for m, turn in zip(msgs, _turns(msgs)) for role, text in m.parts]
        if real != "".join(s + p[3] for s, p in zip(scaffold, parts)) + scaffold[-1]:
            raise DataError(
                f"the tokenizer's chat template rewrites {_rewritten(real, scaffold, parts, msgs)}",
                file=conv.source or None,
            )
        first = scaffold[0]
        # A leading BOS string is `special`, unless the template also opens every turn with it (ChatML
        # tokenizers whose BOS is "<|im_start|>"): then it is a role marker like the others.
        if self.bos and first.startswith(self.bos) and not any(self.bos in s for s in scaffold[1:]):
            b.add(Role.SPECIAL, self.bos, 0)
            first = first[len(self.bos) :]
        scaffold = [first] + scaffold[1:]
        for i, (m, turn, role, text) in enumerate(parts):
            generated = preambles.get(i, "")
            b.add(Role.ROLE, scaffold[i][: len(scaffold[i]) - len(generated)], turn)
            if generated:  # written by the model at inference, after the generation prompt; context before an
                b.add(Role.CONTEXT if role is Role.CONTEXT else Role.RESPONSE, generated, turn)  # answer of weight 0
            b.add(role, text, turn)
            last_of_message = i + 1 == len(parts) or parts[i + 1][0] is not m
            if m.role == "assistant" and last_of_message:
                after = scaffold[i + 1]
                # Whitespace before the end-of-turn string (Llama-2: ' ' + eos_token) is generated too.
                lead = after[: len(after) - len(after.lstrip())]
                rest = after[len(lead) :]
                eot = next((e for e in (self.eos, *END_OF_TURN_STRINGS) if e and rest.startswith(e)), None)
                if eot is None:  # the template does not close the turn: add EOS so the model learns to stop
                    b.add(_closing_role(m), self.eos, turn)
                else:
                    b.add(_closing_role(m), lead + eot, turn)
                    scaffold[i + 1] = rest[len(eot) :]
        b.add(Role.ROLE, scaffold[-1], parts[-1][1] if parts else 0)


def _rewritten(real: str, scaffold: list[str], parts: list[tuple], msgs: list[Message]) -> str:
    """Which message's content a chat template changed, and what to do, for the error that refuses the record
    (a template with `| trim` strips the whitespace around a message: the data can drop it)."""
    pos = 0
    for i, (message, _, _, text) in enumerate(parts):
        pos += len(scaffold[i])
        if real.startswith(text, pos):
            pos += len(text)
            continue
        number = next(k for k, m in enumerate(msgs) if m is message) + 1  # by identity: two messages may be equal
        where = f"the content of message {number} ({message.role})"
        if text != text.strip() and real.startswith(text.strip(), pos):
            return (
                f"{where}: it strips the whitespace around it, so the tokens cannot be tagged; strip it in the data "
                "or use --template chatml or alpaca"
            )
        return f"{where}, so its tokens cannot be tagged; use --template chatml or alpaca"
    return "message content, so its tokens cannot be tagged; use --template chatml or alpaca"


def resolve_template(name: str, tokenizer: Any) -> str:
    """`auto` (the default) -> `tokenizer` when the tokenizer has a chat template, else `chatml` where it has
    ChatML's tokens, else `alpaca`. With the model's own template, training renders the prompts that `generate`,
    `eval`'s chat style and `serve` render (apply_chat_template): `chatml` left out SmolLM2's default system
    prompt, which inference then added. A chat template deltatune saved with a trained output (see
    `training_chat_template`) names its template, which `auto` then is: the same tokens and roles as training
    (segmenting its Jinja rendering tagged Alpaca's preamble `role`, not `template`, and lost Alpaca's input
    section). Other names are returned as given."""
    if name != "auto":
        return name
    carried = carried_template(tokenizer)
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if carried and (carried != "chatml" or ("<|im_start|>" in vocab and "<|im_end|>" in vocab)):
        return carried  # a model or adapter deltatune trained: its training template, not the Jinja rendering of it
    if getattr(tokenizer, "chat_template", None):  # (a carried chatml on a vocabulary without its tokens too)
        return "tokenizer"
    return "chatml" if "<|im_start|>" in vocab and "<|im_end|>" in vocab else "alpaca"


def get_template(name: str, tokenizer: Any) -> Template:
    """The template `name` for this tokenizer (`auto`: see `resolve_template`); a ConfigError if the tokenizer
    cannot support it."""
    name = resolve_template(name, tokenizer)
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise ConfigError("the tokenizer has no EOS token to close responses with", field="--template")
    if name == "alpaca":
        return AlpacaTemplate(name, eos)
    if name == "raw":
        return RawTemplate(name, eos)
    if name == "chatml":
        for tok in ("<|im_start|>", "<|im_end|>"):
            tid = tokenizer.convert_tokens_to_ids(tok)
            if tid is None or tid == tokenizer.unk_token_id:
                raise ConfigError(
                    f"template 'chatml' needs the token {tok}, which this tokenizer lacks; "
                    "use --template alpaca or tokenizer",
                    field="--template",
                )
        return ChatMLTemplate(name, "<|im_end|>", eos)
    if name == "tokenizer":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "this tokenizer has no chat template; use --template chatml or alpaca", field="--template"
            )
        return TokenizerTemplate(name, eos, tokenizer)
    raise ConfigError(f"unknown template '{name}' (choose from {', '.join(TEMPLATES)})", field="--template")


_CARRIED = re.compile(r"\{#- deltatune template: (alpaca|chatml|raw) -#\}")


def carried_template(tokenizer: Any) -> str | None:
    """The training template a tokenizer saved by deltatune carries as its chat template (see
    `training_chat_template`), else None."""
    chat_template = getattr(tokenizer, "chat_template", None)
    carried = _CARRIED.match(chat_template) if isinstance(chat_template, str) else None
    return carried.group(1) if carried else None


def training_chat_template(name: str, tokenizer: Any) -> tuple[str | None, str]:
    """The chat template that renders training's prompts at inference, for the tokenizer saved with the output
    (see `Template.chat_template`; None where the tokenizer's own template is the one training used), and a
    warning ("" if none). It opens with a comment naming the template, which `--template auto` reads back.

    Training puts the BOS id in front of the text's tokens (none where the text opens with BOS's text); a template
    writes BOS as text, and some tokenizers then tokenize the first word otherwise (a Metaspace tokenizer, Llama
    2's and Mistral's kind, marks only the text's first word as word-initial, and BOS text is that first piece).
    So the BOS written is the form, of `bos_token`, `bos_token` and a space unless the text opens with one, and
    none, whose rendering of probe conversations tokenizes exactly as training tokenizes their prompts."""
    from deltatune.data.tokenize import adds_bos, tokenize_examples

    template = get_template(name, tokenizer)
    if template.chat_template() is None:
        return None, ""
    spaced = f"{{{{ bos_token }}}}{{% if not {template.first_text}.startswith(' ') %}}{{{{ ' ' }}}}{{% endif %}}"
    candidates = ["{{ bos_token }}", spaced, ""] if adds_bos(tokenizer) else [""]
    probes = [
        [Message("user", ((Role.INSTRUCTION, "Name a prime number."),))],
        [Message("user", ((Role.INSTRUCTION, " Name a prime number."),))],  # a first text opening with a space
        [Message("system", ((Role.SYSTEM, " Be brief."),)), Message("user", ((Role.INSTRUCTION, "Name one."),))],
    ]
    answer = Message("assistant", ((Role.RESPONSE, "7"),))
    trained = tokenize_examples([template.render(Conversation(p + [answer], "probe")) for p in probes], tokenizer)
    marker = f"{{#- deltatune template: {template.name} -#}}"
    for bos in candidates:
        jinja = marker + template.chat_template(bos)
        if all(
            list(tokenizer(_prompt_text(tokenizer, jinja, p), add_special_tokens=False)["input_ids"])
            == ex.input_ids[: ex.roles.index(Role.RESPONSE)]
            for p, ex in zip(probes, trained)
        ):
            return jinja, ""
    return marker + template.chat_template(candidates[0]), (
        f"the chat template saved with the output renders template '{template.name}' as text, which this "
        "tokenizer tokenizes otherwise than training did; prompts at inference may differ by a token"
    )


def _prompt_text(tokenizer: Any, jinja: str, messages: list[Message]) -> str:
    return tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        chat_template=jinja,
        tokenize=False,
        add_generation_prompt=True,
    )
