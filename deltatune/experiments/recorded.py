"""The project's own measured results, quoted by `deltatune stats` beside the papers' numbers.

A full `deltatune experiment masking` writes OUT/recorded.json; the lead copies it to
deltatune/experiments/results/masking.json (with a note in docs/experiments.md). Until that file
exists, the advice says the measurement is not recorded yet instead of inventing one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

RESULTS = Path(__file__).resolve().parent / "results"


def load_recorded(name: str) -> dict | None:
    """The recorded summary of experiment `name`, or None if none has been recorded."""
    path = RESULTS / f"{name}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


class NearestRun(NamedTuple):
    """The recorded masking result nearest to a dataset: its dataset, that dataset's length ratio, and the
    nearest training-set size with its result (None, None when the dataset has no size recorded)."""

    dataset: str
    ratio: float
    size: str | None
    result: dict | None


def nearest_masking_run(ratio: float, examples: int, recorded: dict | None = None) -> NearestRun | None:
    """The recorded run nearest in length ratio, then in size (both on a log scale); None if none is recorded.
    `deltatune stats` quotes it (`masking_advice`) and weighs its advice by it."""
    recorded = recorded if recorded is not None else load_recorded("masking")
    by = (recorded or {}).get("by_dataset") or {}
    if not by:
        return None
    ds = min(by, key=lambda d: abs(math.log(max(by[d]["ratio"], 1e-6)) - math.log(max(ratio, 1e-6))))
    sizes = by[ds].get("sizes") or {}
    if not sizes:
        return NearestRun(ds, by[ds]["ratio"], None, None)
    size = min(sizes, key=lambda s: abs(math.log(int(s)) - math.log(max(examples, 1))))
    return NearestRun(ds, by[ds]["ratio"], size, sizes[size])


def masking_advice(ratio: float, examples: int, recorded: dict | None = None) -> str:
    """One line: what this project measured nearest to a dataset's length ratio and size."""
    recorded = recorded if recorded is not None else load_recorded("masking")
    near = nearest_masking_run(ratio, examples, recorded)
    if near is None:
        return (
            "This project's own measurement on its default model is not recorded yet "
            "(`deltatune experiment masking`; docs/experiments.md)."
        )
    if near.result is None:
        return f"This project's measurement has no size for {near.dataset} yet (docs/experiments.md)."
    s = near.result
    model = recorded.get("model", "the default model")
    return (
        f"Measured by this project on {model} (docs/experiments.md): {near.dataset} (ratio {near.ratio:.2f}), "
        f"{near.size} training examples: instruction minus response held-out response loss {s['loss_diff']:+.3f} "
        f"(spread {s['loss_diff_spread']:.3f} over {s['seeds']} seeds), exact match {100 * s['em_diff']:+.1f} points: "
        f"{_verdict(s['loss_diff'], s['loss_diff_spread'])}."
    )


def _verdict(loss_diff: float, spread: float) -> str:
    """The measurement in words: a difference within the seed spread is no difference."""
    if abs(loss_diff) <= spread:
        return "no difference beyond the spread between seeds"
    better = "better" if loss_diff < 0 else "worse"
    return f"loss on instructions did {better} there"
