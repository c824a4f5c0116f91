"""The data path in one call: a file (or in-memory records) to tokenized, role-tagged examples.

Weights are not computed here: a loss policy (deltatune.data.masking) turns roles into weights
when batches are collated, so one prepared dataset serves every policy and a two-phase schedule.
"""

from __future__ import annotations

import functools
import gc
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from deltatune.data.formats import (
    FORMATS,
    Conversation,
    Message,
    RawRecord,
    detect_format,
    mixed_format_error,
    parse_column_map,
    read_records,
    rename_columns,
    to_conversation,
)
from deltatune.data.segments import Role, TokenizedExample
from deltatune.data.templates import get_template
from deltatune.data.tokenize import tokenize_examples
from deltatune.errors import ConfigError, DataError

OVERFLOW = ("truncate", "drop")
_KEEP_BAD_MESSAGES = 5


@dataclass
class DataReport:
    """What happened to every record read; `summary()` is one line for logs and the CLI."""

    read: int = 0
    skipped_bad: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_loss: int = 0  # nothing loss-bearing left (the response was cut off by truncation)
    kept: int = 0
    bad: list[str] = field(default_factory=list)  # the first few skipped records' errors
    special_in_content: int = 0  # records whose content holds a special token's text (see `special_tokens_in`)
    first_special: str = ""  # where the first of them is, and the token

    def summary(self) -> str:
        s = (
            f"read {self.read}, kept {self.kept}, skipped bad {self.skipped_bad}, truncated {self.truncated}, "
            f"dropped too long {self.dropped_too_long}, dropped with no loss-bearing token {self.dropped_no_loss}"
        )
        if self.special_in_content:
            s += (
                f"; {self.special_in_content} hold a special token's text in their content, which the tokenizer "
                f"reads as that token (first: {self.first_special})"
            )
        if self.bad:
            s += f" (first bad: {self.bad[0]})"
        return s


def special_tokens_in(tokenizer: Any) -> re.Pattern | None:
    """A pattern matching the text of the tokenizer's special tokens (EOS, `<|im_end|>`, ...), or None. A record
    whose content holds one (a conversation about chat formats, scraped logs) is tokenized with that control
    token there, as transformers' and TRL's tokenization do: an answer quoting `<|im_end|>` trains the model to
    stop mid-answer. Reported, not changed: escaping it would tokenize the content unlike the model's own use."""
    specials = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            specials.add(str(added))
    specials = sorted((t for t in specials if isinstance(t, str) and t), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, specials))) if specials else None


def no_examples_message(source: str | None, report: DataReport) -> str:
    """Why a data source gave nothing to train on, naming the file (None: records passed in Python)."""
    where = f"{source}: " if source else "the records given: "
    if report.read == 0:
        return f"{where}no records (an empty file?)"
    return f"{where}none of its {report.read} records is left for training ({report.summary()})"


@dataclass
class PreparedData:
    examples: list[TokenizedExample]
    report: DataReport
    template: str = ""
    data_format: str = ""


def prepare_dataset(
    path: str | Path,
    tokenizer: Any,
    *,
    template: str = "auto",
    data_format: str = "auto",
    column_map: dict[str, str] | str | None = None,
    max_len: int = 1024,
    overflow: str = "truncate",
    skip_bad: bool = False,
    system_prompt: str | None = None,
    limit: int | None = None,
    keep_offsets: bool = False,
    keep_without_response: bool = False,
    turns: str = "all",
) -> PreparedData:
    """Read `path` (JSONL/JSON/Parquet/CSV) and return tokenized examples with a report.

    A bad record raises DataError (file, line, field) unless `skip_bad`, which counts it instead.
    Examples longer than `max_len` tokens are truncated (keeping the start) or dropped (`overflow`).
    `keep_without_response` keeps an example truncation left without response tokens (a held-out loss under a
    policy that weighs the prompt still scores it); the report does not count it as dropped. `turns="last"`
    (the policy trains each record's last answer alone): an example whose last answer truncation cut away has
    nothing to train and is dropped, as one without any answer is.
    """
    return _prepare(
        read_records(path),
        tokenizer,
        template=template,
        data_format=data_format,
        column_map=column_map,
        max_len=max_len,
        overflow=overflow,
        skip_bad=skip_bad,
        system_prompt=system_prompt,
        limit=limit,
        keep_offsets=keep_offsets,
        keep_without_response=keep_without_response,
        turns=turns,
    )


def prepare_records(
    records: list[dict],
    tokenizer: Any,
    *,
    template: str = "auto",
    data_format: str = "auto",
    column_map: dict[str, str] | str | None = None,
    max_len: int = 1024,
    overflow: str = "truncate",
    skip_bad: bool = False,
    system_prompt: str | None = None,
    limit: int | None = None,
    keep_offsets: bool = False,
    name: str = "<records>",
    turns: str = "all",
) -> PreparedData:
    """Like `prepare_dataset`, for in-memory records; errors name `name` and the record number (1-based)."""
    raw = (RawRecord(r, name, i + 1, i) for i, r in enumerate(records))
    return _prepare(
        raw,
        tokenizer,
        template=template,
        data_format=data_format,
        column_map=column_map,
        max_len=max_len,
        overflow=overflow,
        skip_bad=skip_bad,
        system_prompt=system_prompt,
        limit=limit,
        keep_offsets=keep_offsets,
        turns=turns,
    )


def _without_cyclic_gc(fn):
    """Preparing data makes hundreds of thousands of small objects and no cycles: the cyclic GC would only
    rescan them."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return wrapper


@_without_cyclic_gc
def _prepare(
    raw: Iterable[RawRecord | DataError],
    tokenizer: Any,
    *,
    template: str,
    data_format: str,
    column_map: dict[str, str] | str | None,
    max_len: int,
    overflow: str,
    skip_bad: bool,
    system_prompt: str | None,
    limit: int | None,
    keep_offsets: bool,
    keep_without_response: bool = False,
    turns: str = "all",
) -> PreparedData:
    if data_format == "prompt-completion":  # the config's older name for it
        data_format = "prompt"
    if data_format not in FORMATS:
        raise ConfigError(
            f"unknown data format '{data_format}' (choose from {', '.join(FORMATS)})", field="--data-format"
        )
    if overflow not in OVERFLOW:
        raise ConfigError(f"overflow must be one of {', '.join(OVERFLOW)}, got '{overflow}'", field="--overflow")
    if max_len < 2:
        raise ConfigError(f"max_len must be at least 2, got {max_len}", field="--max-len")
    if limit is not None and limit < 1:  # 0 and -1 gave no examples, silently
        raise ConfigError(f"must be at least 1, got {limit}", field="limit")
    if not hasattr(tokenizer, "get_vocab"):  # a path or None was blamed on the template's EOS
        raise ConfigError(f"expected a tokenizer, got {type(tokenizer).__name__}", field="tokenizer")
    cmap = parse_column_map(column_map)
    tmpl = get_template(template, tokenizer)
    report = DataReport()
    fmt = data_format
    fixed_by: RawRecord | None = None  # the record whose fields fixed the format under "auto"
    examples = []
    budget = char_budget(max_len, tokenizer)
    specials = special_tokens_in(tokenizer)

    def bad(exc: DataError) -> None:
        if not skip_bad:
            raise exc
        report.skipped_bad += 1
        if len(report.bad) < _KEEP_BAD_MESSAGES:
            report.bad.append(str(exc))

    kept = []

    def keep_tokenized() -> None:  # tokenize what is rendered; keep what fits, or is cut, and still answers
        for ex in tokenize_examples(examples, tokenizer, keep_offsets=keep_offsets):
            cut = len(ex) > max_len
            if cut:
                if overflow == "drop":
                    report.dropped_too_long += 1
                    continue
                _truncate(ex, max_len)
            answered = Role.RESPONSE in ex.roles
            if turns == "last" and cut and answered:
                answered = ex.last_response_turn in {t for r, t in zip(ex.roles, ex.turns) if r is Role.RESPONSE}
            if not answered and not keep_without_response:
                report.dropped_no_loss += 1  # counted once: a dropped example is not "truncated" as well
                continue
            report.truncated += cut
            kept.append(ex)
        examples.clear()

    for rec in raw:
        # `limit` counts examples kept for training: records skipped as bad or dropped (too long) do not count
        if limit is not None and len(kept) >= limit:
            break
        report.read += 1
        if isinstance(rec, DataError):
            bad(rec)
            continue
        try:
            if fmt == "auto" and isinstance(rec.data, dict):  # the first recognisable record fixes the file's format
                fmt = detect_format(rename_columns(rec.data, cmap)) or "auto"
                fixed_by = rec
            conv = cut_to_budget(to_conversation(rec, fmt, cmap, system_prompt), budget)
            if specials is not None:
                _note_special_tokens(conv, specials, rec, report)
            example = tmpl.render(conv)
            if example.answers_rendered_as_history and turns != "last":
                raise DataError(
                    f"the tokenizer's chat template writes answer {example.answers_rendered_as_history[0]} "
                    "otherwise in the history than when it ended the conversation (Qwen3 drops earlier turns' think "
                    "blocks), so training it would teach answers without what the model writes first; train the "
                    "last answer alone (policy ...,turns=last) or use --template chatml",
                    file=rec.source,
                )
            examples.append(example)
        except DataError as exc:
            bad(mixed_format_error(exc, rec, fixed_by, fmt, cmap) if data_format == "auto" and fmt != "auto" else exc)
        if limit is not None and len(kept) + len(examples) >= limit:  # enough rendered to reach it, if all are kept
            keep_tokenized()
    keep_tokenized()
    report.kept = len(kept)
    return PreparedData(kept, report, template=tmpl.name, data_format=fmt)  # the resolved name (auto -> ...)


def _note_special_tokens(conv: Conversation, specials: re.Pattern, rec: RawRecord, report: DataReport) -> None:
    for message in conv.messages:
        for _, text in message.parts:
            if found := specials.search(text):
                report.special_in_content += 1
                if not report.first_special:
                    article = "an" if message.role[:1] in "aeiou" else "a"
                    report.first_special = f"{rec.source}: {found.group(0)!r} in {article} {message.role} message"
                return


def max_token_chars(tokenizer: Any) -> int:
    """The most characters one token of `tokenizer` can stand for (its longest vocabulary entry)."""
    key = (id(tokenizer), len(tokenizer))
    if _MAX_TOKEN_CHARS.get("key") != key:
        vocab = tokenizer.get_vocab()
        _MAX_TOKEN_CHARS.update(key=key, value=max((len(t) for t in vocab), default=64))
    return _MAX_TOKEN_CHARS["value"]


_MAX_TOKEN_CHARS: dict[str, Any] = {}


def char_budget(max_len: int, tokenizer: Any) -> int:
    """Characters of content that surely make more than `max_len` tokens: text beyond it is never
    tokenized, so memory follows max_len, not the record. Twice the bound (normalisers can fold
    characters together), plus a margin so that the first max_len tokens are those of the uncut text."""
    return 2 * (max_len + 16) * max(1, max_token_chars(tokenizer))


def cut_to_budget(conv: Conversation, budget: int) -> Conversation:
    """Keep the first `budget` characters of the conversation's content, in order (later parts
    become empty: every message and its template stay, so the rendering keeps its shape)."""
    if sum(len(text) for m in conv.messages for _, text in m.parts) <= budget:
        return conv
    remaining, messages = budget, []
    for m in conv.messages:
        parts = []
        for role, text in m.parts:
            text = text[:remaining]
            remaining -= len(text)
            parts.append((role, text))
        messages.append(Message(m.role, tuple(parts)))
    conv.messages = messages
    return conv


def _truncate(ex: TokenizedExample, max_len: int) -> None:
    """Keep the first `max_len` tokens (the prompt survives; the end of a long response is cut). Which turn held
    the last answer is recorded first: `turns=last` trains that answer, not the last one left."""
    if ex.last_response_turn is None:
        ex.last_response_turn = max((t for r, t in zip(ex.roles, ex.turns) if r is Role.RESPONSE), default=None)
    ex.input_ids = ex.input_ids[:max_len]
    ex.roles = ex.roles[:max_len]
    ex.turns = ex.turns[:max_len]
    if ex.offsets is not None:
        ex.offsets = ex.offsets[:max_len]
    ex.truncated = True
