"""Two settings of deltatune's training, A against B, each run in its own process, interleaved.

Shared by the benchmarks that ask "does this setting speed up `train_speed.py`'s contenders?"
(`allocator_env.py`, `kept_probabilities.py`): each repeat runs every contender once with A and once with
B, so slow minutes of a shared machine fall on both; a row gives the medians, every pair's ratio and peak
RSS. A variant is `(ctx, env)`: the contender's context (train_speed.py's `ctx`) and extra environment.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from machine import run_child

HERE = Path(__file__).resolve().parent


def benchmark_context(steps: int, warmup: int) -> tuple[dict, int]:
    """train_speed.py's context for the default model and data, and the tokens of its timed steps."""
    from train_speed import BATCH, benchmark_data, resolve_precision

    from deltatune.models import default_model_dir, load_tokenizer

    model = str(default_model_dir())
    ctx = {
        "model": model,
        "precision": resolve_precision("auto"),
        "steps": steps,
        "warmup": warmup,
        "examples": (steps + warmup) * BATCH,
    }
    _, examples, batches = benchmark_data(load_tokenizer(model), ctx["examples"])
    return ctx, sum(len(examples[i]) for batch in batches[warmup:] for i in batch)


def run_pairs(contenders: list[str], variants: dict[str, tuple[dict, dict | None]], repeats: int, tokens: int):
    """Rows of {contender, tokens_per_s (median by variant), runs_tokens_per_s, pair_speedups, peak_rss_mib}; the
    pairs are the second variant's tokens/s over the first's, repeat by repeat."""
    first, second = list(variants)
    rows = []
    for name in contenders:
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for rep in range(repeats):
            for variant, (ctx, env) in variants.items():
                r = run_child(str(HERE / "train_speed.py"), name, ctx, env=env)
                runs[variant].append({"tokens_per_s": tokens / r["seconds"], "peak_rss_mib": r["peak_rss_mib"]})
                print(f"  [{rep + 1}/{repeats}] {name} {variant}: {tokens / r['seconds']:.0f} tokens/s", flush=True)
        tps = {v: [r["tokens_per_s"] for r in rs] for v, rs in runs.items()}
        rows.append(
            {
                "contender": name,
                "tokens_per_s": {v: statistics.median(x) for v, x in tps.items()},
                "runs_tokens_per_s": tps,
                "pair_speedups": [b / a for a, b in zip(tps[first], tps[second])],
                "peak_rss_mib": {v: statistics.median(r["peak_rss_mib"] for r in rs) for v, rs in runs.items()},
            }
        )
    return rows


def print_pairs(rows: list[dict]) -> None:
    first, second = list(rows[0]["tokens_per_s"])
    print(f"\n| contender | {first} tokens/s | {second} tokens/s | pairs | peak RSS MiB ({first}, {second}) |")
    print("|---|---:|---:|---|---:|")
    for r in rows:
        pairs = ", ".join(f"{x:.2f}" for x in r["pair_speedups"])
        tps, rss = r["tokens_per_s"], r["peak_rss_mib"]
        print(
            f"| {r['contender']} | {tps[first]:.0f} | {tps[second]:.0f} | {pairs} "
            f"| {rss[first]:,.0f}, {rss[second]:,.0f} |"
        )
