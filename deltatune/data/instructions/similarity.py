"""Text similarity for de-duplication: ROUGE-L (as Self-Instruct uses it) and MinHash over word 3-grams."""

from __future__ import annotations

import re
from functools import lru_cache

from rouge_score import rouge_scorer

_WORD = re.compile(r"\w+")
SHINGLE = 3  # words per shingle
NUM_PERM = 128


def normalise(text: str) -> str:
    """Case and whitespace do not make a record new."""
    return " ".join(text.split()).casefold()


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's own tokenisation (lower case, alphanumeric words), computed once per text."""
    return _scorer()._tokenizer.tokenize(text)


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F-measure of two token lists, exactly as `RougeScorer(['rougeL']).score` computes it."""
    if not a or not b:
        return 0.0
    return rouge_scorer._score_lcs(a, b).fmeasure


def shingles(text: str) -> set[str]:
    words = _WORD.findall(text.casefold())
    if len(words) < SHINGLE:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + SHINGLE]) for i in range(len(words) - SHINGLE + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class NearDuplicateIndex:
    """Finds an earlier text whose word-3-gram Jaccard similarity is at least `threshold`.

    MinHash LSH (datasketch) proposes candidates in sub-linear time, built for recall (a band
    threshold 0.1 under `threshold`, false negatives weighted 49 to 1: none missed in 600 pairs just
    above each threshold from 0.5 to 1.0); the exact Jaccard of the shingle sets decides, so a
    reported similarity is a true one.
    """

    def __init__(self, threshold: float, seed: int = 1) -> None:
        from datasketch import MinHash, MinHashLSH

        self._minhash = MinHash
        self.threshold = threshold
        self.seed = seed
        # Tuned for recall: LSH built at the decision threshold missed a third of the pairs just above it, and
        # the exact check can only reject candidates; it also has no bands for a threshold of 0.99 and above.
        self.lsh = MinHashLSH(threshold=max(0.1, min(threshold - 0.1, 0.9)), num_perm=NUM_PERM, weights=(0.02, 0.98))
        self.sets: dict[int, set[str]] = {}

    def match(self, text: str) -> tuple[int, float] | None:
        """(key, similarity) of the most similar indexed text at or above the threshold, else None."""
        s = shingles(text)
        if not s:  # no word ("?", an emoji): nothing to compare, and Jaccard(∅, ∅) = 1 would call all such texts one
            return None  # (a repeat of the same text is the exact-duplicate test's)
        best = None
        for key in self.lsh.query(self._hash(s)):
            sim = jaccard(s, self.sets[key])
            if sim >= self.threshold and (best is None or (sim, -key) > (best[1], -best[0])):
                best = (key, sim)
        return best

    def add(self, key: int, text: str) -> None:
        s = shingles(text)
        self.sets[key] = s
        self.lsh.insert(key, self._hash(s))

    def _hash(self, s: set[str]):
        m = self._minhash(num_perm=NUM_PERM, seed=self.seed)
        m.update_batch([x.encode("utf-8") for x in sorted(s)])
        return m
