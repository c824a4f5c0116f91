"""Learning versus forgetting ("LoRA Learns Less and Forgets Less", arXiv 2405.09673).

learning   = mean over target tasks of (run score - base score)   -- gain where we trained
forgetting = mean over source tasks of (base score - run score)   -- loss of what the base could do
Both are plain means of each task's headline metric (accuracy, exact match, ROUGE-L), so a point
up and to the left of another learned less and forgot more.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LearnForget:
    label: str
    learning: float
    forgetting: float
    scores: dict[str, float]

    def as_row(self) -> dict:
        return {"label": self.label, "learning": self.learning, "forgetting": self.forgetting, **self.scores}


def learn_forget(label: str, base: dict[str, float], run: dict[str, float], targets: list[str],
                 sources: list[str], lower_is_better: frozenset[str] | set[str] = frozenset()) -> LearnForget:
    """Aggregate one run's task scores against the base model's.

    For a metric where lower is better (a held-out loss), the gain is base - run instead.
    """
    missing = [t for t in targets + sources if t not in base or t not in run]
    if missing:
        raise KeyError(f"no score for task {missing[0]!r}")

    def gain(t: str) -> float:
        return base[t] - run[t] if t in lower_is_better else run[t] - base[t]
    learning = sum(gain(t) for t in targets) / len(targets) if targets else float("nan")
    forgetting = -sum(gain(s) for s in sources) / len(sources) if sources else float("nan")
    return LearnForget(label, learning, forgetting, {t: run[t] for t in dict.fromkeys(targets + sources)})
