"""Keep fewer, better records (the LIMA lesson): drop exact and near duplicates and records of the wrong length.

Records are read and validated exactly as `deltatune train` reads them; the first occurrence of a
duplicate survives, later ones are dropped, and the report says which record each dropped one repeats.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltatune.data.instructions.rows import prompt_text, read_instruction_records, response_text
from deltatune.data.instructions.similarity import NearDuplicateIndex, normalise, rouge_l, rouge_tokens
from deltatune.errors import ConfigError

NEAR = ("minhash", "rouge", "none")
DEFAULT_THRESHOLD = {"minhash": 0.8, "rouge": 0.7}


@dataclass
class FilterOptions:
    near: str = "minhash"
    threshold: float | None = None  # None: DEFAULT_THRESHOLD[near]
    on: str = "prompt"  # "prompt" (system + user side) or "all" (prompt and response)
    min_response_tokens: int | None = None
    max_response_tokens: int | None = None
    max_prompt_tokens: int | None = None

    def check(self) -> float:
        """One line for an option that cannot work (before any tokenizer loads); the near-duplicate threshold."""
        if self.near not in NEAR:
            raise ConfigError(f"unknown near-duplicate test '{self.near}' (choose {', '.join(NEAR)})", field="--near")
        if self.on not in ("prompt", "all"):
            raise ConfigError(f"must be prompt or all, got '{self.on}'", field="--on")
        if self.near == "none" and self.threshold is not None:  # it was accepted and ignored
            raise ConfigError("has no effect with --near none (no near-duplicate test runs)", field="--threshold")
        threshold = self.threshold if self.threshold is not None else DEFAULT_THRESHOLD.get(self.near, 1.0)
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"must be in (0, 1], got {threshold}", field="--threshold")
        limits = {"--min-response-tokens": 0, "--max-response-tokens": 1, "--max-prompt-tokens": 1}  # the least
        for (name, least), value in zip(
            limits.items(), (self.min_response_tokens, self.max_response_tokens, self.max_prompt_tokens)
        ):
            if value is not None and value < least:
                raise ConfigError(f"must be {least} or more, got {value}", field=name)
        low, high = self.min_response_tokens, self.max_response_tokens
        if low is not None and high is not None and low > high:
            raise ConfigError(
                f"{low} is above --max-response-tokens {high}: no record could pass", field="--min-response-tokens"
            )
        return threshold


@dataclass
class FilterReport:
    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    examples: list[dict] = field(default_factory=list)  # every drop: source, reason, duplicate_of, similarity

    def format(self) -> str:
        lines = [f"read {self.read}, kept {self.kept}, dropped {self.read - self.kept}"]
        lines += [f"  {reason}: {n}" for reason, n in sorted(self.dropped.items())]
        for ex in self.examples[:5]:
            extra = (
                f" (repeats {ex['duplicate_of']}, similarity {ex['similarity']:.2f})" if "duplicate_of" in ex else ""
            )
            lines.append(f"  e.g. {ex['source']}: {ex['reason']}{extra}")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        return {"read": self.read, "kept": self.kept, "dropped": dict(self.dropped), "examples": self.examples}


def filter_records(
    path: str | Path, options: FilterOptions, *, column_map: dict[str, str] | str | None = None, tokenizer: Any = None
) -> tuple[list[dict], FilterReport]:
    """The surviving records (columns renamed, so they train without --map) in file order, and a report."""
    threshold = options.check()
    limits = (options.min_response_tokens, options.max_response_tokens, options.max_prompt_tokens)
    if any(v is not None for v in limits) and tokenizer is None:
        raise ConfigError("token length limits need a tokenizer", field="--model")
    rows, _ = read_instruction_records(path, column_map)
    report = FilterReport(read=len(rows))
    exact: dict[str, str] = {}
    near_index = NearDuplicateIndex(threshold) if options.near == "minhash" else None
    rouge_kept: list[tuple[str, list[str]]] = []
    kept: list[dict] = []

    def drop(source: str, reason: str, **extra) -> None:
        report.dropped[reason] += 1  # each named (the report kept 20; the docs promise every one)
        report.examples.append({"source": source, "reason": reason, **extra})

    for rec, conv in rows:
        prompt, response = prompt_text(conv), response_text(conv)
        if tokenizer is not None and any(v is not None for v in limits):
            reason = _length_reason(tokenizer, prompt, response, options)
            if reason:
                drop(rec.source, reason)
                continue
        if conv.kind == "text":  # a plain-text document has no prompt side: compare the document
            text = response
        else:
            # the user's side: a system prompt that many records share made them near duplicates of each other
            asked = "\n".join(m.content for m in conv.messages if m.role == "user")
            text = asked if options.on == "prompt" else prompt + "\n" + response
        key = normalise(text)
        if key in exact:
            drop(rec.source, "exact_duplicate", duplicate_of=exact[key], similarity=1.0)
            continue
        if near_index is not None:
            hit = near_index.match(text)
            if hit is not None:
                drop(rec.source, "near_duplicate", duplicate_of=kept[hit[0]]["__source"], similarity=hit[1])
                continue
            near_index.add(len(kept), text)
        elif options.near == "rouge":
            tokens = rouge_tokens(text)
            best = max(((rouge_l(tokens, t), src) for src, t in rouge_kept), default=None, key=lambda x: x[0])
            if best is not None and best[0] >= threshold:
                drop(rec.source, "near_duplicate", duplicate_of=best[1], similarity=best[0])
                continue
            rouge_kept.append((rec.source, tokens))
        exact[key] = rec.source
        kept.append({**rec.data, "__source": rec.source})
    report.kept = len(kept)
    return [{k: v for k, v in r.items() if k != "__source"} for r in kept], report


def _length_reason(tokenizer: Any, prompt: str, response: str, o: FilterOptions) -> str | None:
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    if o.max_prompt_tokens is not None and count(prompt) > o.max_prompt_tokens:
        return "prompt_too_long"
    if o.min_response_tokens is not None or o.max_response_tokens is not None:
        n = count(response)
        if o.min_response_tokens is not None and n < o.min_response_tokens:
            return "response_too_short"
        if o.max_response_tokens is not None and n > o.max_response_tokens:
            return "response_too_long"
    return None
