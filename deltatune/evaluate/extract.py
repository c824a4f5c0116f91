"""Pull the final answer out of a generated text, per task, and normalise it for exact match.

GSM8K: the strict form is the number after the first `#### ` (the data set's own answer format, lm-eval's
strict regex `#### (-?[0-9.,]+)`); the flexible form is the last number in the whole text, `####` or not
(lm-eval's flexible regex takes its last match too; a minus sign counts only right before the digits, so a
bullet "- 72" is 72 and "50 - 5" ends in 5). BIG-Bench Hard: multiple-choice targets look like "(B)" and accept
"(B)", "B", "B)" or "the answer is (B)"; other targets (True/False, Yes/No, valid/invalid, numbers, word lists)
compare after case and punctuation normalisation.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")
_STRICT = re.compile(r"#### (-?[0-9.,]+)")  # lm-eval's gsm8k strict-match regex, first match
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
    """The normalised answer number: after the first '#### ' (strict), else the last number in the text (flexible,
    as lm-eval's flexible-extract: a '####' earlier in the text does not choose it)."""
    if strict:
        m = _STRICT.search(text)
        return normalize_number(m.group(1)) if m else None
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


_OPTION = re.compile(r"\(([A-Z])\)")
# a reply that is only an option: "(B)", "B", "**B**", "'B'.", "B)"
_ONLY_OPTION = re.compile(r"[*_\"'`]*\(?([A-Z])\)?[).:*_\"'`]*")
_OPENS_WITH_OPTION = re.compile(r"[*_\"'`]*\([A-Z]\)")
# the first line's leading letter: "B) text", "B. text", "B: text" (not "A dog": the article, or "I think")
_LEADING_LETTER = re.compile(r"[*_\"'`]*([A-Z])(?:[).:*_\"'`]|$)")
# a conclusion line: "So B is correct", "Therefore (B)", "Answer: B", "the correct option is (B)"
_CONCLUSION = re.compile(
    r"\b(?:so|therefore|thus|hence|answer|final|conclusion)\b|\bis\s+(?:the\s+)?(?:correct|right|best)\b", re.I
)
_CONCLUDED_LETTER = re.compile(  # the letter itself in capitals: "a" is not an option
    r"\b([A-Z])\)?\s+(?i:is\s+(?:the\s+)?(?:correct|right|best|answer))\b"
    r"|\b(?i:so|therefore|thus|hence|option|choice|answer)\b\W{1,3}\(?([A-Z])\b\)?(?=\s*(?:$|[.,;:!*]|is\b))"
)


def extract_bbh(text: str, target: str) -> str:
    """The prediction in the target's form: '(X)' for multiple choice, else the first answer line."""
    after_answer_is = bool(_ANSWER_IS.search(text))
    body = _after_answer_is(text).strip()
    if _MC_TARGET.match(target.strip()):
        letter = _mc_letter(body, after_answer_is)
        return f"({letter})" if letter else normalize_answer(body.split("\n")[0])  # lower case: never "(X)"
    first_line = body.split("\n")[0] if body else ""
    return normalize_answer(first_line)


def _mc_letter(body: str, after_answer_is: bool) -> str | None:
    """The option a reply (after its last 'answer is') gives, or None; strict, as lm-eval's strict match is, so
    that no rule favours an option by its position (a reply that walks through the options names (A) first).

    - Every "(X)" in the reply names the same option: that one, unless a conclusion names another.
    - Several options named: the first line if it names one option and is only that option, concludes, or is
      the only line that opens with an option ("(C) Paris", "Answer: (C)", then an explanation: the shots' direct
      format; a walk-through opens line after line with one), else a conclusion,
      the last line naming an option that says so/therefore/answer/"is correct" ("So B is correct."), naming one;
      otherwise none ("(A) or (C)", "(C), not (A)", a plain walk-through).
    - None named: a leading bare letter ("B", "B)", "**B**"; followed by a word only right after "answer is",
      so a reply opening with the article "A" or "I" is no answer), else a conclusion as above."""
    lines = [ln.strip() for ln in body.split("\n") if ln.strip()]
    if not lines:
        return None
    named = {x for ln in lines for x in _OPTION.findall(ln)}
    if len(named) == 1:
        concluded = {a or b for ln in lines for a, b in _CONCLUDED_LETTER.findall(ln)}
        return named.pop() if concluded <= named else None  # "B is correct. (A) is wrong" is no (A)
    if named:
        first = set(_OPTION.findall(lines[0]))
        opening = [ln for ln in lines if _OPENS_WITH_OPTION.match(ln)]  # a walk-through opens line after line so
        leads = len(first) == 1 and (
            _ONLY_OPTION.fullmatch(lines[0]) or opening == [lines[0]] or _CONCLUSION.search(lines[0])
        )
        return first.pop() if leads else _conclusion(lines)  # "(C) Paris" / "Answer: (C)", then an explanation
    leading = _LEADING_LETTER.match(lines[0]) or (after_answer_is and re.match(r"([A-Z])\s", lines[0]))
    return leading.group(1) if leading else _conclusion(lines)


def _conclusion(lines: list[str]) -> str | None:
    """The one option the last option-naming line concludes on, if it reads as a conclusion."""
    for line in reversed(lines):
        letters = set(_OPTION.findall(line)) | {a or b for a, b in _CONCLUDED_LETTER.findall(line)}
        if letters:
            return letters.pop() if len(letters) == 1 and _CONCLUSION.search(line) else None
    return None


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
