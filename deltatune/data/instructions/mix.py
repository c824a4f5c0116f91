"""A seeded mixture of instruction files in given proportions (`A.jsonl:0.7 B.jsonl:0.3 --n N`).

Counts are N times the normalised weights, rounded by largest remainder so they sum to N. A file
asked for more records than it has is repeated whole as often as needed and the rest drawn, and the
report says so. Files of one format are mixed as they are; different formats become chat records.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from deltatune.data.instructions.rows import as_chat, read_instruction_records
from deltatune.errors import ConfigError, DataError


@dataclass
class MixSource:
    path: str
    weight: float


@dataclass
class MixPart:
    path: str
    weight: float
    available: int
    taken: int

    @property
    def repeated(self) -> bool:
        return self.taken > self.available


def parse_sources(specs: list[str]) -> list[MixSource]:
    """`FILE:WEIGHT` items (the last colon splits, so paths may hold colons)."""
    out = []
    for spec in specs:
        path, sep, weight = spec.rpartition(":")
        try:
            w = float(weight)
        except ValueError:
            w = float("nan")
        if not sep or not path or not math.isfinite(w) or w <= 0:
            raise ConfigError(f"'{spec}' is not FILE:WEIGHT with a positive weight", field="sources")
        out.append(MixSource(path, w))
    return out


def mixture_counts(weights: list[float], n: int) -> list[int]:
    """Largest-remainder rounding of n * w / sum(w); ties go to the earlier source."""
    total = sum(weights)
    exact = [n * w / total for w in weights]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def mix(sources: list[MixSource], n: int, seed: int = 0) -> tuple[list[dict], list[MixPart]]:
    """`n` records drawn from `sources` in proportion to their weights, shuffled with `seed`."""
    if n < 1:
        raise ConfigError(f"must be at least 1, got {n}", field="--n")
    seen: dict[Path, str] = {}
    for s in sources:  # one file twice drew some records twice, while the summary said "without replacement"
        real = Path(s.path).resolve()
        if real in seen:
            raise ConfigError(
                f"{s.path} is the same file as {seen[real]}: give it once, with the weights added up", field="sources"
            )
        seen[real] = s.path
    loaded = [read_instruction_records(s.path) for s in sources]
    formats = {fmt for _, fmt in loaded}
    if "text" in formats and len(formats) > 1:
        raise DataError(
            "plain-text files cannot be mixed with instruction files",
            file=next(s.path for s, (_, f) in zip(sources, loaded) if f == "text"),
        )
    convert = len(formats) > 1
    rng = random.Random(seed)
    picked: list[dict] = []
    parts = []
    for src, (rows, _), count in zip(sources, loaded, mixture_counts([s.weight for s in sources], n)):
        whole, rest = divmod(count, len(rows))
        idx = list(range(len(rows))) * whole + sorted(rng.sample(range(len(rows)), rest))
        picked += [as_chat(rows[i][1]) if convert else rows[i][0].data for i in idx]
        parts.append(MixPart(src.path, src.weight, len(rows), count))
    rng.shuffle(picked)
    return picked, parts


def format_parts(parts: list[MixPart]) -> str:
    total = sum(p.taken for p in parts)
    lines = [f"{total} records from {len(parts)} files"]
    for p in parts:
        note = f" (repeated: only {p.available} available)" if p.repeated else ""
        lines.append(f"  {p.path}: weight {p.weight:g}, {p.taken} of {p.available}{note}")
    return "\n".join(lines) + "\n"
