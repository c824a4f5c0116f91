"""Answer-level metrics: exact match, token F1, ROUGE-L, and the mean over a task.

ROUGE-L is the `rouge-score` package's (Google's reference implementation), F-measure, with
stemming, so numbers compare with the self-instruct and Alpaca papers.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_text(text: str) -> str:
    """SQuAD's normalisation (its evaluation script, in its order): lower case, punctuation removed, articles
    dropped, single spaces. Punctuation is deleted, not spaced: "1,000" is "1000" and "U.S." is "us"."""
    text = _PUNCT.sub("", text.lower())
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str | None, reference: str) -> float:
    """1.0 when the (already extracted and normalised) strings are equal."""
    return float(prediction is not None and prediction == reference)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 on normalised text; two empty strings count as a match."""
    pred, ref = normalize_text(prediction).split(), normalize_text(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence), from `rouge-score`."""
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")
