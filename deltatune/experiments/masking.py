"""`deltatune experiment masking`: which tokens should carry the loss (Instruction Modelling, arXiv 2405.14394).

Two datasets from ../shared/data, each with a held-out split that never enters training:
- gsm8k: question -> worked answer (long responses: a low instruction/response ratio);
  exact match compares the final number of the greedy answer;
- mmlu: question and its four options -> the answer's text (short responses: a high ratio);
  exact match compares the greedy answer's text.
Runs (LoRA on all linear layers, chatml template unless said):
- headline: `response` vs `instruction` at every training-set size (`--sizes`), every seed, with
  the same number of optimizer steps for every size within a dataset;
- the other policies at the smallest size, first seed: `all`, `weighted:0.1`, and the two-phase
  `instruction->response@HALF` (under chatml, `no-boilerplate` equals `instruction`: ChatML has no
  constant text besides its role markers);
- the Alpaca-template arm (mmlu, smallest size): `response`, `instruction` (the seed article's
  reading: only role headers masked, the constant preamble trained) and `no-boilerplate` (the
  paper's method section: all template text masked);
- `loss_reduction: example` for the headline policies at the smallest size, first seed.
Measured on held-out examples at the end of each run: the loss on response tokens only (the same
measure for every policy), greedy exact match, and the held-out-minus-train response-loss gap.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HELP = "loss masking policies vs instruction/response length ratio and data size (Instruction Modelling)"
DEFAULT_SEEDS = 2
HEADLINE = ("response", "instruction")
OTHER_POLICIES = ("all", "weighted:0.1", "two-phase")
ALPACA_POLICIES = ("response", "instruction", "no-boilerplate")

FULL = {
    "sizes": [50, 200, 800],
    "steps": {"gsm8k": 24, "mmlu": 32},
    "batch_size": 8,
    "heldout": 48,
    "generate": {"gsm8k": 16, "mmlu": 48},
    "max_new": {"gsm8k": 160, "mmlu": 40},
    "train_loss_examples": 48,
}
QUICK = {
    "sizes": [2, 4, 8],
    "steps": {"gsm8k": 2, "mmlu": 2},
    "batch_size": 4,
    "heldout": 4,
    "generate": {"gsm8k": 2, "mmlu": 2},
    "max_new": {"gsm8k": 8, "mmlu": 8},
    "train_loss_examples": 4,
}


def add_arguments(p: argparse._ArgumentGroup) -> None:
    p.add_argument("--sizes", default=None, help="training-set sizes, comma-separated (full 50,200,800)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of every run (full: gsm8k 24, mmlu 32)")
    p.add_argument("--batch-size", type=int, default=None, help="packed 512-token rows per optimizer step (full 8)")
    p.add_argument(
        "--heldout", type=int, default=None, help="examples for the held-out and the training response loss (full 48)"
    )
    p.add_argument(
        "--generate", type=int, default=None, help="held-out questions answered greedily (full: gsm8k 16, mmlu 48)"
    )
    p.add_argument("--data-root", default=None, help="folder with gsm8k/ and mmlu/ (default: ../shared/data)")


# --- data ---------------------------------------------------------------------------------------
def gsm8k_records(root: Path) -> tuple[list[dict], list[dict]]:
    """(train pool, held-out) from train.jsonl and test.jsonl."""

    def read(path: Path) -> list[dict]:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [{"instruction": r["question"], "output": r["answer"]} for r in rows]

    return read(root / "gsm8k" / "train.jsonl"), read(root / "gsm8k" / "test.jsonl")


def mmlu_records(root: Path, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Questions with their options -> the answer's text; subjects shuffled together, a fixed half held out."""
    from deltatune.evaluate.tasks import read_mmlu

    items = [it for path in sorted((root / "mmlu").glob("*.csv")) for it in read_mmlu(path)]
    records = [
        {"instruction": it.prompt + "\nOptions:\n" + "\n".join(f"- {o}" for o in it.options), "output": it.shot_answer}
        for it in items
        if it.shot_answer.strip()
    ]
    random.Random(seed).shuffle(records)
    half = len(records) // 2
    return records[:half], records[half:]


def subset(pool: list[dict], n: int, seed: int) -> list[dict]:
    """`n` training records; the smaller sizes are prefixes of the larger (nested subsets)."""
    order = list(range(len(pool)))
    random.Random(1000 + seed).shuffle(order)
    return [pool[i] for i in order[:n]]


def gsm8k_correct(prediction: str, reference: str) -> bool:
    from deltatune.evaluate.extract import extract_gsm8k, gsm8k_target

    return extract_gsm8k(prediction, strict=False) == gsm8k_target(reference)


def text_correct(prediction: str, reference: str) -> bool:
    from deltatune.evaluate.metrics import exact_match

    return bool(exact_match(prediction, reference))


# --- measurement --------------------------------------------------------------------------------
def response_loss(model, tokenizer, records: list[dict], template: str) -> float:
    """Mean loss per response token (the same measure whatever the training policy)."""
    from deltatune.data.masking import LossPolicy, policy_weights
    from deltatune.data.pipeline import prepare_records
    from deltatune.evaluate.loss import heldout_loss

    examples = prepare_records(records, tokenizer, template=template, max_len=512).examples
    for ex in examples:
        ex.weights = policy_weights(ex, LossPolicy("response"))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return heldout_loss(model, examples, batch_size=8, pad_id=pad, progress=False).loss


def make_measure(
    tokenizer,
    dataset: str,
    template: str,
    train_records: list[dict],
    heldout: list[dict],
    gen_records: list[dict],
    max_new: int,
    n_train_loss: int,
):
    from deltatune.experiments.common import generation_prompts, greedy_answers

    prompts = generation_prompts(gen_records, tokenizer, template)
    correct = gsm8k_correct if dataset == "gsm8k" else text_correct
    train_part = train_records[:n_train_loss]

    def measure(step, model) -> dict:
        answers = greedy_answers(model, tokenizer, prompts, max_new, batch_size=16)
        held = response_loss(model, tokenizer, heldout, template)
        train = response_loss(model, tokenizer, train_part, template)
        return {
            "heldout_response_loss": held,
            "train_response_loss": train,
            "gap": held - train,
            "exact_match": sum(correct(a, r["output"]) for a, r in zip(answers, gen_records)) / len(gen_records),
            "sample": answers[0][:200],
        }

    return measure


def length_ratio(tokenizer, records: list[dict]) -> dict:
    """The paper's Table 1 measure: mean instruction tokens / mean response tokens (chatml)."""
    from deltatune.data.pipeline import prepare_records
    from deltatune.data.stats import dataset_stats

    examples = prepare_records(records, tokenizer, template="chatml", max_len=10**9).examples
    s = dataset_stats(examples, max_len=512, seq_len=512, batch_size=8)
    return {
        "ratio": s["ratio_instruction_to_response"],
        "instruction_tokens": s["tokens"]["instruction"]["mean"],
        "response_tokens": s["tokens"]["response"]["mean"],
        "examples": len(examples),
    }


# --- the experiment -----------------------------------------------------------------------------
def parse_sizes(text: str | None) -> list[int]:
    """--sizes '50,200' -> [50, 200] ([] when not given)."""
    from deltatune.errors import UserError

    try:
        sizes = [int(s) for s in text.split(",")] if text else []
    except ValueError:
        sizes = [0]
    if sizes and min(sizes) < 1:
        raise UserError(f"--sizes needs positive whole numbers, e.g. 50,200,800; got '{text}'")
    if len(set(sizes)) != len(sizes):  # each size names its runs: a repeat would make the same runs twice
        raise UserError(f"--sizes names a size twice: '{text}'")
    return sizes


def check_arguments(args: argparse.Namespace) -> None:
    """Options no run of the plan could honour, refused before the folder is claimed (they stopped the
    experiment at the first run that met them, or were cut down silently and reported under the size asked)."""
    from deltatune.errors import UserError
    from deltatune.evaluate.tasks import data_root

    plan = resolved_plan(args.quick, args)
    if min(plan["steps"].values()) < 2:  # the two-phase arm switches at steps // 2: at 0 its first phase never trains
        raise UserError(f"--steps must be at least 2 (the two-phase policy switches half-way), got {args.steps}")
    root = data_root(args.data_root)
    for ds, (pool, heldout_pool) in {"gsm8k": gsm8k_records(root), "mmlu": mmlu_records(root)}.items():
        if max(plan["sizes"]) > len(pool):
            raise UserError(f"--sizes {max(plan['sizes'])} is more than the {len(pool)} {ds} training records")
        wanted = max(plan["heldout"], plan["generate"][ds])
        if wanted > len(heldout_pool):
            option = "--heldout" if plan["heldout"] >= plan["generate"][ds] else "--generate"
            raise UserError(f"{option} {wanted} is more than the {len(heldout_pool)} {ds} held-out records")


def defining_settings(args: argparse.Namespace) -> dict:
    """The plan this invocation resolves to, defaults included, for the folder's manifest: a folder made under
    other defaults (sizes, steps, held-out counts, generation lengths) is refused, not mixed with it."""
    return {"plan": resolved_plan(args.quick, args)}


def resolved_plan(quick: bool, args: argparse.Namespace) -> dict:
    """QUICK or FULL with the command line's overrides applied."""
    plan = json.loads(json.dumps(QUICK if quick else FULL))  # a deep copy: the overrides must not touch the defaults
    if args.batch_size:
        plan["batch_size"] = args.batch_size
    if args.heldout:
        plan["heldout"] = plan["train_loss_examples"] = args.heldout
    if args.generate:
        plan["generate"] = {ds: args.generate for ds in plan["generate"]}
    if args.steps:
        plan["steps"] = {ds: args.steps for ds in plan["steps"]}
    plan["sizes"] = parse_sizes(args.sizes) or plan["sizes"]
    return plan


def run(ctx, args: argparse.Namespace) -> None:
    from deltatune.evaluate.tasks import data_root
    from deltatune.experiments.common import Run
    from deltatune.models import load_tokenizer

    plan = resolved_plan(ctx.quick, args)
    sizes = plan["sizes"]
    root = data_root(args.data_root)
    tokenizer = load_tokenizer(ctx.model)
    pools = {"gsm8k": gsm8k_records(root), "mmlu": mmlu_records(root)}
    ratios = {ds: length_ratio(tokenizer, subset(pool, max(sizes), 0)) for ds, (pool, _) in pools.items()}
    for ds, r in ratios.items():
        ctx.say(
            f"[masking] {ds}: instruction/response length ratio {r['ratio']:.2f} "
            f"({r['instruction_tokens']:.0f} / {r['response_tokens']:.0f} tokens)"
        )
    runs = []
    first_seed, smallest = ctx.seeds[0], min(sizes)

    def add(ds: str, size: int, seed: int, policy: str, template: str = "chatml", reduction: str = "token") -> None:
        pool, heldout_pool = pools[ds]
        steps = plan["steps"][ds]
        train_records = subset(pool, size, seed)
        spec = f"instruction->response@{steps // 2}" if policy == "two-phase" else policy
        heldout = heldout_pool[: plan["heldout"]]
        measure = make_measure(
            tokenizer,
            ds,
            template,
            train_records,
            heldout,
            heldout_pool[: plan["generate"][ds]],
            plan["max_new"][ds],
            plan["train_loss_examples"],
        )
        name = f"{ds}-n{size}-{policy.replace(':', '')}-{template}-{reduction}-s{seed}"
        config = {
            "method": "lora",
            "rank": 16,
            "alpha": 32,
            "lr": 1e-3,
            "targets": "all-linear",
            "steps": steps,
            "batch_size": plan["batch_size"],
            "seq_len": 512,
            "template": template,
            "policy": spec,
            "loss_reduction": reduction,
            "seed": seed,
            "eval_fraction": 0.0,
            "warmup_ratio": 0.05,
        }
        runs.append(
            Run(
                name,
                config,
                records=train_records,
                measure=measure,
                measure_steps=(steps,),
                meta={
                    "dataset": ds,
                    "size": size,
                    "policy": policy,
                    "template": template,
                    "loss_reduction": reduction,
                    "seed": seed,
                },
            )
        )

    for ds in pools:
        for size in sizes:
            for seed in ctx.seeds:
                for policy in HEADLINE:
                    add(ds, size, seed, policy)
        for policy in OTHER_POLICIES:
            add(ds, smallest, first_seed, policy)
        for policy in HEADLINE:
            add(ds, smallest, first_seed, policy, reduction="example")
    for policy in ALPACA_POLICIES:
        add("mmlu", smallest, first_seed, policy, template="alpaca")

    results = ctx.run_all(runs)
    rows = [dict(r, **r["measured"][str(r["steps"])]) for r in results.values()]
    gains = instruction_gains(rows, ratios)
    plot = "masking_gain.png"
    ctx.keep_earlier_report()  # before the plot replaces its PNG
    gain_plot(gains, ctx.out / plot)
    tables = [
        ("Instruction/response length ratio (chatml tokens; the paper's Table 1 measure)", ratio_table(ratios)),
        (
            "Headline: instruction minus response, held-out response loss (lower = better for instruction)",
            gain_table(gains),
        ),
        ("All runs (means over seeds)", runs_table(rows)),
    ]
    recorded = record_summary(gains, ratios, ctx.model or "SmolLM2-135M-Instruct")
    if not ctx.worker:  # before results.json, which says the report is complete (a kill between left it stale)
        from deltatune.experiments.common import write_atomic

        write_atomic(ctx.out / "recorded.json", json.dumps(recorded, indent=2) + "\n")
    ctx.finish(
        {"sizes": sizes, "plan": plan, "ratios": ratios, "gains": gains, "recorded": recorded, "runs": results},
        tables,
        [plot],
        notes=[
            "Held-out response loss is measured on response tokens for every policy, so rows compare.",
            "Gain columns are instruction minus response: a negative loss difference and a positive "
            "exact-match difference favour loss on instructions. ± is half the spread over seeds.",
        ],
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def instruction_gains(rows: list[dict], ratios: dict) -> list[dict]:
    """Per dataset and size: instruction minus response (held-out response loss, exact match, gap), per seed."""
    out = []
    keyed = {
        (r["dataset"], r["size"], r["policy"], r["seed"]): r
        for r in rows
        if r["template"] == "chatml" and r["loss_reduction"] == "token"
    }
    for ds, size in sorted({(k[0], k[1]) for k in keyed}):
        seeds = sorted(
            k[3] for k in keyed if k[:3] == (ds, size, "instruction") and (ds, size, "response", k[3]) in keyed
        )
        if not seeds:
            continue
        d_loss = [
            keyed[(ds, size, "instruction", s)]["heldout_response_loss"]
            - keyed[(ds, size, "response", s)]["heldout_response_loss"]
            for s in seeds
        ]
        d_em = [
            keyed[(ds, size, "instruction", s)]["exact_match"] - keyed[(ds, size, "response", s)]["exact_match"]
            for s in seeds
        ]
        out.append(
            {
                "dataset": ds,
                "size": size,
                "ratio": ratios[ds]["ratio"],
                "seeds": seeds,
                "response_loss": _mean([keyed[(ds, size, "response", s)]["heldout_response_loss"] for s in seeds]),
                "instruction_loss": _mean(
                    [keyed[(ds, size, "instruction", s)]["heldout_response_loss"] for s in seeds]
                ),
                "loss_diff": _mean(d_loss),
                "loss_diff_spread": max(d_loss) - min(d_loss),
                "em_diff": _mean(d_em),
                "em_diff_spread": max(d_em) - min(d_em),
                "response_gap": _mean([keyed[(ds, size, "response", s)]["gap"] for s in seeds]),
                "instruction_gap": _mean([keyed[(ds, size, "instruction", s)]["gap"] for s in seeds]),
            }
        )
    return out


def ratio_table(ratios: dict) -> str:
    from deltatune.experiments.common import markdown_table

    return markdown_table(
        ["dataset", "instruction tokens", "response tokens", "ratio"],
        [[ds, r["instruction_tokens"], r["response_tokens"], r["ratio"]] for ds, r in ratios.items()],
    )


def gain_table(gains: list[dict]) -> str:
    from deltatune.experiments.common import markdown_table

    rows = [
        [
            g["dataset"],
            g["size"],
            g["response_loss"],
            g["instruction_loss"],
            f"{g['loss_diff']:+.3f} ± {g['loss_diff_spread'] / 2:.3f}",
            f"{100 * g['em_diff']:+.1f} ± {50 * g['em_diff_spread']:.1f}",
            g["response_gap"],
            g["instruction_gap"],
        ]
        for g in gains
    ]
    return markdown_table(
        [
            "dataset",
            "train size",
            "response: held-out loss",
            "instruction: held-out loss",
            "loss diff",
            "exact match diff (pts)",
            "response: gap",
            "instruction: gap",
        ],
        rows,
    )


def runs_table(rows: list[dict]) -> str:
    from deltatune.experiments.common import markdown_table

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["size"], r["policy"], r["template"], r["loss_reduction"]), []).append(r)
    table = [
        [
            *key,
            len(rs),
            _mean([r["heldout_response_loss"] for r in rs]),
            _mean([r["train_response_loss"] for r in rs]),
            _mean([r["gap"] for r in rs]),
            f"{100 * _mean([r['exact_match'] for r in rs]):.1f}",
            f"{_mean([r['tokens_per_s'] for r in rs]):.0f}",
        ]
        for key, rs in sorted(groups.items(), key=lambda kv: tuple(str(k) for k in kv[0]))
    ]
    return markdown_table(
        [
            "dataset",
            "size",
            "policy",
            "template",
            "reduction",
            "seeds",
            "held-out resp. loss",
            "train resp. loss",
            "gap",
            "exact match %",
            "tokens/s",
        ],
        table,
    )


def gain_plot(gains: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deltatune.experiments.common import save_figure

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for ds in sorted({g["dataset"] for g in gains}):
        gs = [g for g in gains if g["dataset"] == ds]
        a.errorbar(
            [g["size"] for g in gs],
            [-g["loss_diff"] for g in gs],
            yerr=[g["loss_diff_spread"] / 2 for g in gs],
            marker="o",
            capsize=3,
            label=f"{ds} (ratio {gs[0]['ratio']:.2f})",
        )
    a.set_xscale("log")
    a.axhline(0, color="gray", lw=0.8)
    a.set_xlabel("training examples")
    a.set_ylabel("gain: response loss - instruction loss (held-out)")
    a.set_title("Instruction modelling gain vs data size")
    a.legend(fontsize=8)
    sizes = sorted({g["size"] for g in gains})
    for size in sizes:
        gs = sorted((g for g in gains if g["size"] == size), key=lambda g: g["ratio"])
        b.plot([g["ratio"] for g in gs], [-g["loss_diff"] for g in gs], marker="o", label=f"{size} examples")
    b.set_xscale("log")
    b.axhline(0, color="gray", lw=0.8)
    b.set_xlabel("instruction/response length ratio")
    b.set_title("... vs length ratio")
    b.legend(fontsize=8)
    save_figure(fig, path)


def record_summary(gains: list[dict], ratios: dict, model: str) -> dict:
    """The small summary `deltatune stats` quotes (copy OUT/recorded.json to deltatune/experiments/results/masking.json)."""
    return {
        "experiment": "masking",
        "model": model,
        "by_dataset": {
            ds: {
                "ratio": ratios[ds]["ratio"],
                "sizes": {
                    str(g["size"]): {
                        "loss_diff": g["loss_diff"],
                        "em_diff": g["em_diff"],
                        "seeds": len(g["seeds"]),
                        "loss_diff_spread": g["loss_diff_spread"],
                    }
                    for g in gains
                    if g["dataset"] == ds
                },
            }
            for ds in ratios
        },
    }
