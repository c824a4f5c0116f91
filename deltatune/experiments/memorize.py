"""`deltatune experiment memorize`: MoRA vs LoRA at memorizing random UUID pairs (MoRA, arXiv 2405.12130, Table 2).

N key -> value pairs of random version-4 UUIDs come from a seed. Each run trains on "key" -> "value"
(chatml template, loss on the value and its end-of-turn token only) and is measured on the same keys
(memorization): greedy character accuracy (position by position over the value's 36 characters) and
exact match, at `--points` steps during training. Runs, on all linear layers: full finetuning, LoRA
r=8, MoRA at LoRA r=8's parameter count (type 6, rotation), each for every seed (the headline), and
LoRA at `--high-rank` and MoRA at that count (type 1, sharing) on the first seed. The paper's shape: LoRA r=8 barely memorizes, MoRA at
the same count approaches full finetuning, high ranks close the gap.
"""

from __future__ import annotations

import argparse
import random
import uuid

HELP = "MoRA vs LoRA memorizing random UUID pairs (MoRA paper, Table 2)"
DEFAULT_SEEDS = 2
PAPER_TABLE2 = {  # character accuracy (%) at steps 300/500/700/900, LLaMA-2 7B, 10k pairs (docs/methods.md §13)
    "steps": [300, 500, 700, 900],
    "full": [42.5, 100, 100, 100],
    "lora-r8": [9.9, 10.0, 10.7, 54.2],
    "mora-r8": [10.1, 15.7, 87.4, 100],
    "lora-r256": [9.9, 70.6, 100, 100],
    "mora-r256": [41.6, 100, 100, 100],
}
UUID_CHARS = 36


def add_arguments(p: argparse._ArgumentGroup) -> None:
    p.add_argument("--pairs", type=int, default=None, help="UUID pairs to memorize (full 64, quick 16)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (full 120, quick 8)")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per step (full 16, quick 8)")
    p.add_argument("--high-rank", type=int, default=None, help="the high LoRA rank (full 128, quick 16)")
    p.add_argument("--points", type=int, default=4, help="measurements during training (>= 4 for the table)")
    p.add_argument("--eval-keys", type=int, default=None, help="keys generated at each measurement (default: all)")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad options before the output folder is claimed."""
    from deltatune.errors import UserError

    if args.high_rank is not None and args.high_rank <= 8:  # the low arms are r=8: their runs would be named twice
        raise UserError(f"--high-rank must be above 8 (the low-rank arms use r=8), got {args.high_rank}")


def uuid_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """`n` (key, value) pairs of version-4 UUID strings from `seed`; keys are unique."""
    rng = random.Random(seed)
    pairs, keys = [], set()
    while len(pairs) < n:
        key, value = (str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(2))
        if key not in keys:
            keys.add(key)
            pairs.append((key, value))
    return pairs


def char_accuracy(prediction: str, reference: str) -> float:
    """Fraction of the reference's characters that the prediction has at the same position."""
    if not reference:
        raise ValueError("empty reference")
    return sum(a == b for a, b in zip(prediction, reference)) / len(reference)


def memorization_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean character accuracy and exact match (both in [0, 1])."""
    n = len(references)
    return {
        "char_acc": sum(char_accuracy(p, r) for p, r in zip(predictions, references)) / n,
        "exact": sum(p == r for p, r in zip(predictions, references)) / n,
    }


ROW = 96  # tokens per training row: one pair of the default model (~77 tokens) and no room for a second


def row_length(lengths: list[int]) -> int:
    """Tokens per training row for pairs of these token lengths: every pair whole (a value cut at the row's
    end would be scored on characters it was never trained on) and one pair a row (rows are packed, so a
    row with room for two would make `--batch-size` count rows, not pairs). `ROW` when it fits both."""
    longest, shortest = max(lengths), min(lengths)
    return max(longest, min(ROW, 2 * shortest - 1))


def arms(high_rank: int, quick: bool) -> list[dict]:
    """The five methods and their settings (learning rates scaled from the paper's to a small model and
    ~100 steps: the paper's 3e-5 / 3e-4 / 1e-4 are for 1,000 steps of a 7B model)."""
    return [
        {"arm": "full", "method": "full", "rank": None, "lr": 1e-4 if not quick else 1e-3},
        {"arm": "lora-r8", "method": "lora", "rank": 8, "alpha": 16, "lr": 2e-3 if not quick else 1e-2},
        {"arm": "mora-r8", "method": "mora", "rank": 8, "mora_type": 6, "lr": 2e-3 if not quick else 1e-2},
        {
            "arm": f"lora-r{high_rank}",
            "method": "lora",
            "rank": high_rank,
            "alpha": 2 * high_rank,
            "lr": 5e-4 if not quick else 5e-3,
        },
        {
            "arm": f"mora-r{high_rank}",
            "method": "mora",
            "rank": high_rank,
            "mora_type": 1,
            "lr": 5e-4 if not quick else 5e-3,
        },
    ]


def run(ctx, args: argparse.Namespace) -> None:
    from deltatune.data.pipeline import prepare_records
    from deltatune.experiments.common import Run, generation_prompts, greedy_answers, measure_points
    from deltatune.models import load_tokenizer

    n_pairs = args.pairs or (16 if ctx.quick else 64)
    steps = args.steps or (8 if ctx.quick else 120)
    batch = args.batch_size or (8 if ctx.quick else 16)
    high = args.high_rank or (16 if ctx.quick else 128)
    points = measure_points(steps, max(1, args.points))
    tokenizer = load_tokenizer(ctx.model)
    runs = []
    for seed in ctx.seeds:
        pairs = uuid_pairs(n_pairs, seed)
        records = [{"instruction": k, "output": v} for k, v in pairs]
        keys = records[: args.eval_keys] if args.eval_keys else records
        prompts = generation_prompts(keys, tokenizer, "chatml")
        references = [r["output"] for r in keys]
        max_new = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references) + 2
        seq_len = row_length(
            [len(ex) for ex in prepare_records(records, tokenizer, template="chatml", max_len=10**9).examples]
        )

        def measure(step, model, prompts=prompts, references=references, max_new=max_new):
            return memorization_scores(greedy_answers(model, tokenizer, prompts, max_new), references)

        for arm in arms(high, ctx.quick):
            if arm["rank"] not in (None, 8) and seed != ctx.seeds[0]:
                continue  # the high-rank arms run on the first seed only (docs/experiments.md: the time budget)
            config = {
                "method": arm["method"],
                "lr": arm["lr"],
                "steps": steps,
                "batch_size": batch,
                "seed": seed,
                "template": "chatml",
                "policy": "response",
                "targets": "all-linear",
                "seq_len": seq_len,
                "warmup_ratio": 0.03,
                "schedule": "cosine",
                "eval_fraction": 0.0,
                "max_grad_norm": 1.0,
            }
            if arm["rank"] is not None:
                config["rank"] = arm["rank"]
            if "alpha" in arm:
                config["alpha"] = arm["alpha"]
            if "mora_type" in arm:
                config["method_options"] = {"mora_type": arm["mora_type"]}
            runs.append(
                Run(
                    f"{arm['arm']}-s{seed}",
                    config,
                    records=records,
                    measure=measure,
                    measure_steps=points,
                    meta={
                        "arm": arm["arm"],
                        "method": arm["method"],
                        "rank": arm["rank"],
                        "seed": seed,
                        "lr": arm["lr"],
                    },
                )
            )
    results = ctx.run_all(runs)
    summary = summarize(results, points, [a["arm"] for a in arms(high, ctx.quick)])
    tables = [
        ("Character accuracy (%) against steps (mean over seeds; ± half the spread)", table2(summary, points)),
        ("Runs", runs_table(results)),
        ("Paper (LLaMA-2 7B, 10k pairs, 1,000 pairs per batch; Table 2)", paper_table()),
    ]
    plot = "memorize.png"
    ctx.keep_earlier_report()  # before the plot replaces its PNG
    accuracy_plot(
        summary,
        points,
        ctx.out / plot,
        title=f"UUID memorization ({n_pairs} pairs, {'quick' if ctx.quick else ctx.model or 'default model'})",
    )
    ctx.finish(
        {
            "pairs": n_pairs,
            "steps": steps,
            "batch_size": batch,
            "high_rank": high,
            "points": list(points),
            "summary": summary,
            "runs": results,
            "paper_table2": PAPER_TABLE2,
        },
        tables,
        [plot],
    )


def summarize(results: dict[str, dict], points: tuple[int, ...], arm_order: list[str]) -> dict[str, dict]:
    """Per arm: mean and spread (max - min over seeds) of char accuracy and exact match at each point."""
    out = {}
    for arm in arm_order:
        rows = [r for r in results.values() if r["arm"] == arm]
        if not rows:
            continue
        entry = {
            "seeds": [r["seed"] for r in rows],
            "trainable_params": rows[0]["trainable_params"],
            "tokens_per_s": sum(r["tokens_per_s"] for r in rows) / len(rows),
            "final_loss": sum(r["final_loss"] for r in rows) / len(rows),
        }
        for key in ("char_acc", "exact"):
            means, spreads = [], []
            for p in points:
                vals = [r["measured"][str(p)][key] for r in rows]
                means.append(sum(vals) / len(vals))
                spreads.append(max(vals) - min(vals))
            entry[key], entry[f"{key}_spread"] = means, spreads
        out[arm] = entry
    return out


def table2(summary: dict, points: tuple[int, ...]) -> str:
    from deltatune.experiments.common import markdown_table

    rows = []
    for arm, s in summary.items():
        cells = [
            f"{100 * m:.1f}" + (f" ± {50 * d:.1f}" if len(s["seeds"]) > 1 else "")
            for m, d in zip(s["char_acc"], s["char_acc_spread"])
        ]
        rows.append([arm, f"{s['trainable_params']:,}", *cells, f"{100 * s['exact'][-1]:.1f}"])
    return markdown_table(["method", "trainable", *[f"step {p}" for p in points], "exact match % (last)"], rows)


def runs_table(results: dict[str, dict]) -> str:
    from deltatune.experiments.common import markdown_table

    rows = [
        [
            name,
            r["method"],
            r["rank"] or "-",
            f"{r['trainable_params']:,}",
            r["lr"],
            f"{r['tokens_per_s']:.0f}",
            r["final_loss"],
            f"{100 * r['measured'][max(r['measured'], key=int)]['char_acc']:.1f}",
        ]
        for name, r in results.items()
    ]
    return markdown_table(
        ["run", "method", "rank", "trainable", "lr", "tokens/s", "final loss", "char acc % (last)"], rows
    )


def paper_table() -> str:
    from deltatune.experiments.common import markdown_table

    return markdown_table(
        ["method", *[f"step {s}" for s in PAPER_TABLE2["steps"]]],
        [[k, *v] for k, v in PAPER_TABLE2.items() if k != "steps"],
    )


def accuracy_plot(summary: dict, points: tuple[int, ...], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deltatune.experiments.common import save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, s in summary.items():
        mean = [100 * v for v in s["char_acc"]]
        half = [50 * d for d in s["char_acc_spread"]]
        ax.errorbar(
            list(points), mean, yerr=half, marker="o", capsize=3, label=f"{arm} ({s['trainable_params'] / 1e6:.2f}M)"
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("character accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
