"""Learning versus forgetting ("LoRA Learns Less and Forgets Less", arXiv 2405.09673).

learning   = mean over target tasks of (run score - base score)   -- gain where we trained
forgetting = mean over source tasks of (base score - run score)   -- drop in what the base could do
Both average only fraction-valued headline metrics (accuracy, exact match, pass@k, ROUGE-L in
[0, 1]), so they share one unit and a point up and to the left of another learned less and forgot
more. Loss-type measures (held-out loss in nats, perplexity) are never averaged with those: each
loss task is reported on its own as base, run and change (run - base; positive = worse).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

LOSS_METRICS = frozenset({"loss", "perplexity"})


@dataclass
class LearnForget:
    label: str
    learning: float  # fraction (nan when no fraction-valued target)
    forgetting: float  # fraction (nan when no fraction-valued source)
    scores: dict[str, float]  # fraction-valued tasks: the run's score
    losses: dict[str, dict[str, float]] = field(default_factory=dict)  # loss tasks: base, run, change

    def as_row(self) -> dict:
        return {"label": self.label, "learning": self.learning, "forgetting": self.forgetting, **self.scores}

    def loss_rows(self) -> list[dict]:
        return [{"label": self.label, "task": t, **v} for t, v in self.losses.items()]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def learn_forget(
    label: str,
    base: dict[str, float],
    run: dict[str, float],
    targets: list[str],
    sources: list[str],
    loss_tasks: frozenset[str] | set[str] = frozenset(),
) -> LearnForget:
    """Aggregate one run's task scores against the base model's.

    Tasks in `loss_tasks` (lower is better, not a fraction) go into `losses`, never into the means.
    Every other score must be a fraction in [0, 1]: a value outside is a mixed-up metric, an error.
    """
    missing = [t for t in targets + sources if t not in base or t not in run]
    if missing:
        raise KeyError(f"no score for task {missing[0]!r}")
    for t in dict.fromkeys(targets + sources):
        if t not in loss_tasks and not all(0.0 <= v[t] <= 1.0 or math.isnan(v[t]) for v in (base, run)):
            raise ValueError(f"task {t!r}: score outside [0, 1]; pass it in loss_tasks if it is a loss")
    learning = _mean([run[t] - base[t] for t in targets if t not in loss_tasks])
    forgetting = _mean([base[s] - run[s] for s in sources if s not in loss_tasks])
    scores = {t: run[t] for t in dict.fromkeys(targets + sources) if t not in loss_tasks}
    losses = {
        t: {"base": base[t], "run": run[t], "change": run[t] - base[t]}
        for t in dict.fromkeys(targets + sources)
        if t in loss_tasks
    }
    return LearnForget(label, learning, forgetting, scores, losses)
