"""Pull the final answer out of a generated text, per task, and normalise it for exact match.

GSM8K: the strict form is the number after `#### ` (the data set's own answer format); the
flexible form is the last number in the text. BIG-Bench Hard: multiple-choice targets look like
"(B)" and accept "(B)", "B", "B)" or "the answer is (B)"; other targets (True/False, Yes/No,
valid/invalid, numbers, word lists) compare after case and punctuation normalisation.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\s?\.\d+")
_STRICT = re.compile(r"####\s*(-?\$?\s?[\d,]*\.?\d+)")
_ANSWER_IS = re.compile(r"answer is[:\s]*", re.IGNORECASE)
_MC_TARGET = re.compile(r"^\(([A-Z])\)$")


def normalize_number(text: str | None) -> str | None:
    """'$1,000.00' -> '1000', '18.0' -> '18', '-0.50' -> '-0.5', ' 7. ' -> '7'; None if not a number."""
    if text is None:
        return None
    t = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(t)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_gsm8k(text: str, strict: bool = True) -> str | None:
    """The normalised answer number: after '####' (strict), else the last number (flexible)."""
    m = _STRICT.search(text)
    if m:
        return normalize_number(m.group(1))
    if strict:
        return None
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def gsm8k_target(answer: str) -> str:
    """The reference number of a GSM8K `answer` field."""
    value = extract_gsm8k(answer, strict=True)
    if value is None:
        raise ValueError(f"GSM8K answer without '#### N': {answer[-60:]!r}")
    return value


def _after_answer_is(text: str) -> str:
    matches = list(_ANSWER_IS.finditer(text))
    return text[matches[-1].end() :] if matches else text


def normalize_answer(text: str) -> str:
    """Case, surrounding punctuation/quotes and repeated spaces do not matter; numbers are normalised."""
    t = " ".join(text.strip().split())
    t = t.strip(" .\"'`*")
    number = normalize_number(t) if _NUMBER.fullmatch(t.replace(" ", "")) else None
    return number if number is not None else t.lower()


def extract_bbh(text: str, target: str) -> str:
    """The prediction in the target's form: '(X)' for multiple choice, else the first answer line.

    Multiple choice reads the first line (after the last 'answer is', else of the whole text) that names an
    option as "(X)": the answer comes first in the shots' direct format, and an explanation may follow. A line
    that names several options ("(A) or (C)", "(A) is wrong, (C) is right") has no single prediction and
    matches no target: taking the first named credited a text that lists the options (lm-eval's strict match
    takes none of them)."""
    body = _after_answer_is(text).strip()
    if _MC_TARGET.match(target.strip()):
        for line in body.split("\n"):
            named = set(re.findall(r"\(([A-Z])\)", line))
            if len(named) == 1:
                return f"({named.pop()})"
            if named:
                return normalize_answer(line)  # lower case: never an "(X)" target
        # a bare letter, also in markdown bold or quotes as chat models write it: "**B**", "'B'."
        m = re.match(r"[*_\"'`]*([A-Z])(?:[).:\s*_\"'`]|$)", body)
        return f"({m.group(1)})" if m else normalize_answer(body.split("\n")[0])
    first_line = body.split("\n")[0] if body else ""
    return normalize_answer(first_line)


def bbh_target(target: str) -> str:
    t = target.strip()
    return t if _MC_TARGET.match(t) else normalize_answer(t)


def extract_letter(text: str, n_options: int) -> str | None:
    """A bare choice letter ('B', '(B)', 'B.', 'Answer: B') among the first n_options letters."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n_options]
    m = re.search(rf"\(?\b([{letters}])\b\)?", _after_answer_is(text).strip())
    return m.group(1) if m else None


def first_line(text: str) -> str:
    """For free-text tasks: the whole answer, stripped (kept as a named extractor for task tables)."""
    return text.strip()


EXTRACTORS = {"gsm8k": extract_gsm8k, "bbh": extract_bbh, "letter": extract_letter, "text": first_line}
