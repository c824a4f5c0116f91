"""Pull the final answer out of a generated text, per task, and normalise it for exact match.

GSM8K follows lm-eval's gsm8k task exactly (lm_eval/tasks/gsm8k/gsm8k.yaml, 0.4.x): the strict form is the
first match of `#### (-?[0-9.,]+)`, the flexible form the last match of `(-?[$0-9.,]{2,})|(-?[0-9]+)` anywhere
in the text (a `####` earlier does not choose it; a run of punctuation such as "..." is a match, as there), and
both sides of the comparison drop ",", "$", everything up to the last "#### " and one trailing "." and are
lower-cased (its `regexes_to_ignore`, `ignore_case`). So "18.0" is not "18", as in lm-eval. BIG-Bench Hard:
multiple-choice targets look like "(B)" and accept "(B)", "B", "B)" or "the answer is (B)"; other targets
(True/False, Yes/No, valid/invalid, numbers, word lists) compare after case and punctuation normalisation.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")
_STRICT = re.compile(r"#### (-?[0-9.,]+)")  # lm-eval's gsm8k strict-match regex, first match
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # its flexible-extract regex, last match
# its exact_match `regexes_to_ignore`, applied in this order to prediction and reference alike
_GSM8K_IGNORED = tuple(re.compile(p) for p in (",", r"\$", r"(?s).*#### ", r"\.$"))
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
    """The answer as lm-eval compares it: after the first '#### ' (strict), else the last match of the flexible
    regex in the whole text; None where lm-eval's filter finds nothing (its "[invalid]", never equal)."""
    if strict:
        m = _STRICT.search(text)
        found = m.group(1) if m else None
    else:
        matches = _FLEXIBLE.findall(text)
        found = next((g for g in matches[-1] if g), None) if matches else None
    return _gsm8k_compared(found.strip()) if found is not None else None


def _gsm8k_compared(text: str) -> str:
    """lm-eval's exact_match preprocessing for gsm8k: the ignored regexes removed, then lower case."""
    for pattern in _GSM8K_IGNORED:
        text = pattern.sub("", text)
    return text.lower()


def gsm8k_target(answer: str) -> str:
    """The reference of a GSM8K `answer` field as lm-eval compares it (what follows its last '#### ')."""
    if "#### " not in answer:
        raise ValueError(f"GSM8K answer without '#### N': {answer[-60:]!r}")
    return _gsm8k_compared(answer)


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
