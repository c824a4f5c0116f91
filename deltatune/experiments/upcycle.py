"""Sparse upcycling vs dense continuation (arXiv 2212.05055, Fig. 2-3 in spirit).

From the same dense checkpoint, three runs train for the same steps on the same data (GSM8K train,
ChatML template as held-out loss is measured, response-only loss; full finetuning, same lr schedule and seed): the dense model
("dense continuation"), and the model upcycled to E=4 and E=8 experts (top-2, raw softmax weights,
every other layer, load-balancing loss 0.01). Held-out loss (GSM8K test) is measured before
training and at evenly spaced steps, and reported against steps, wall time and training FLOPs
(3 x forward FLOPs per trained token; forward = 2 x parameters a token passes through, attention's
quadratic term left out, the same for all runs). The paper's shape: the upcycled model pulls ahead
of dense continuation at equal extra compute, after a visible start-up drop.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from deltatune.errors import UserError
from deltatune.experiments.common import Context, Run, markdown_table, measure_points, save_figure, write_atomic

HELP = "sparse upcycling: dense continuation vs upcycled E=4/E=8 top-2, held-out loss vs steps, time and FLOPs"
DEFAULT_SEEDS = 1


def add_arguments(p) -> None:
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 120; quick 3)")
    p.add_argument("--experts", default="4,8", help="expert counts to upcycle to (default 4,8)")
    p.add_argument("--batch-size", type=int, default=None, help="packed rows per step (default 4; quick 2)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per packed row (default 256; quick 64)")
    p.add_argument("--lr", type=float, default=2e-5, help="learning rate of every run (default 2e-5)")
    p.add_argument("--eval-examples", type=int, default=64, help="held-out GSM8K test examples (default 64)")
    p.add_argument("--points", type=int, default=None, help="held-out measurements per run (default 6; quick 2)")
    p.add_argument(
        "--normalize",
        action="store_true",
        help="renormalised top-2 weights (start equal to the dense model) instead of the raw softmax "
        "weights of the paper's decoder (start with every MoE layer's MLP scaled down)",
    )


def _experts(value: str) -> list[int]:
    """The expert counts of `--experts` ("4,8"): each at least 2 (top-2 routing), no repeats, at least one."""
    try:
        experts = [int(e) for e in str(value).split(",") if e.strip()]
    except ValueError:
        raise UserError(f"--experts takes comma-separated expert counts such as 4,8, got {value!r}") from None
    if not experts:
        raise UserError("--experts needs at least one expert count (e.g. 4,8): there is nothing to compare")
    if min(experts) < 2:
        raise UserError(f"--experts: every count must be at least 2 (top-2 routing), got {value!r}")
    if len(set(experts)) != len(experts):
        raise UserError(f"--experts names a count twice: {value!r}")
    return experts


def check_arguments(args) -> None:
    """Refuse bad options before the output folder is claimed or a model is loaded."""
    _experts(args.experts)
    if not (math.isfinite(args.lr) and args.lr > 0):  # inf passed, to a NaN loss in the first run
        raise UserError(f"--lr must be a positive number, got {args.lr}")


def _sizes(args, quick: bool) -> dict:
    """The sizes a run uses: the options given, else the mode's defaults."""
    return {
        "steps": args.steps or (3 if quick else 120),
        "batch_size": args.batch_size or (2 if quick else 4),
        "seq_len": args.seq_len or (64 if quick else 256),
        "points": args.points or (2 if quick else 6),
    }


def defining_settings(args) -> dict:
    """The sizes actually used (a default stands for its value), checked when a folder is resumed."""
    sizes = _sizes(args, args.quick)
    return {k: sizes[k] for k in ("batch_size", "seq_len", "points")}


def _records(quick: bool, n_eval: int) -> tuple[list[dict], list[dict]]:
    if quick:
        rows = [
            {"instruction": f"What is {a} + {b}?", "output": f"The answer is {a + b}."}
            for a in range(8)
            for b in range(8)
        ]
        return rows[8:], rows[:4]

    from deltatune.evaluate.tasks import data_root

    gsm8k = data_root() / "gsm8k"  # ../shared/data, or $DELTATUNE_DATA as for eval

    def read(name: str, limit: int | None = None) -> list[dict]:
        try:
            lines = (gsm8k / name).read_text(encoding="utf-8").splitlines()[:limit]
        except FileNotFoundError:
            raise UserError(
                f"the GSM8K data is not at {gsm8k / name} (set DELTATUNE_DATA to the folder that holds gsm8k/)"
            ) from None
        return [{"instruction": r["question"], "output": r["answer"]} for r in map(json.loads, lines)]

    return read("train.jsonl"), read("test.jsonl", n_eval)


SETUP = "setup"  # start.json's record of what its losses and OUT/models were made from


def _setup(ctx: Context, args, seq_len: int) -> dict:
    """What the start losses and the upcycled models depend on: the dense model, the routing weights, the
    held-out examples and their length."""
    return {
        "model": ctx.model,
        "quick": ctx.quick,
        "normalize": bool(args.normalize),
        "eval_examples": args.eval_examples,
        "seq_len": seq_len,
    }


def _start_of_setup(ctx: Context, start_file: Path, setup: dict) -> dict:
    """start.json when it was made under `setup`, else a new one recording `setup` (written now), with the
    upcycled models of the earlier setup removed.

    A folder retaken after a set-up that stopped before its first run (Context: another command, no run yet)
    holds the earlier command's models and start losses: reused, `--normalize` reported raw-softmax models and
    `--eval-examples` a start loss on other examples. A start.json without a setup (made before it was
    recorded) is kept where runs exist: the folder's manifest then vouches for its settings."""
    start = json.loads(start_file.read_text(encoding="utf-8")) if start_file.exists() else None
    if start is not None and start.get(SETUP) == setup:
        return start
    if start is not None and SETUP not in start and (ctx.out / "runs").exists():
        start[SETUP] = setup
    else:
        for folder in sorted((ctx.out / "models").glob("upcycled-e*")):
            if (folder / "upcycle.json").exists():  # this experiment's own (it writes only these there)
                ctx.say(f"[upcycle] {folder} was made under other settings; building it again")
                shutil.rmtree(folder)
        start = {SETUP: setup}
    write_atomic(start_file, json.dumps(start, indent=2) + "\n")
    return start


def _make_upcycled(source: str | None, experts: int, folder: Path, normalize: bool) -> str:
    """The upcycled checkpoint of the run (built once; a finished folder is reused on resume)."""
    if not (folder / "upcycle.json").exists():
        from deltatune.models import load_model, save_model
        from deltatune.upcycle.convert import UpcycleSpec, decoder_layers, parse_layers, upcycle

        model, tok = load_model(source)
        layers = parse_layers("every-other", len(decoder_layers(model)))
        save_model(upcycle(model, UpcycleSpec(experts=experts, layers=layers, k=2, normalize=normalize)), tok, folder)
    return str(folder)


def _flops_per_token(model) -> tuple[int, int]:
    """(parameters, forward FLOPs per token = 2 x parameters a token's matmuls use)."""
    from deltatune.upcycle.convert import count_parameters

    counts = count_parameters(model)
    active = counts["active_per_token"]
    if not getattr(model.config, "tie_word_embeddings", False):
        active -= model.get_input_embeddings().weight.numel()  # a lookup, not a matmul
    return counts["total"], 2 * active


def _loss_meter(eval_records: list[dict], tokenizer, seq_len: int):
    from deltatune.data.masking import LossPolicy, policy_weights
    from deltatune.data.pipeline import prepare_records
    from deltatune.evaluate.loss import heldout_loss

    examples = list(prepare_records(eval_records, tokenizer, template="chatml", max_len=seq_len).examples)
    for ex in examples:
        ex.weights = policy_weights(ex, LossPolicy("response"))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def measure(step: int, model) -> dict:
        t0 = time.perf_counter()
        loss = heldout_loss(model, examples, batch_size=8, pad_id=pad, progress=False).loss
        return {"heldout_loss": loss, "eval_seconds": time.perf_counter() - t0}

    return measure


def measure_start(measure, model, precision: str | None = None) -> dict:
    """The held-out loss before training, under the autocast the run's later points are measured with (the
    training loop measures them inside its step's autocast): bf16 where precision auto picks it, as the runs do."""
    from contextlib import nullcontext

    import torch

    from deltatune.config import TrainConfig
    from deltatune.train.loop import pick_precision

    device = next(model.parameters()).device
    precision = precision or pick_precision(TrainConfig(), device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    with autocast:
        return measure(0, model)


def run(ctx: Context, args) -> None:
    from deltatune.models import load_model

    quick = ctx.quick
    sizes = _sizes(args, quick)
    steps, seq_len = sizes["steps"], sizes["seq_len"]
    experts = _experts(args.experts)
    train_records, eval_records = _records(quick, args.eval_examples)
    base = ctx.model
    # parameters, FLOPs per token and the held-out loss before training (kept for resume), and the setup that
    # made them and the upcycled models: recorded before the models are built
    start_file = ctx.out / "start.json"
    start = _start_of_setup(ctx, start_file, _setup(ctx, args, seq_len))
    models = {"dense": base}
    for e in experts:
        models[f"upcycled-e{e}"] = _make_upcycled(base, e, ctx.out / "models" / f"upcycled-e{e}", args.normalize)

    points = measure_points(steps, sizes["points"])
    runs = []
    for name, ref in models.items():
        model, tok = load_model(ref)
        measure = _loss_meter(eval_records, tok, seq_len)
        if name not in start:
            params, fwd = _flops_per_token(model)
            start[name] = {"params": params, "fwd_flops_per_token": fwd, **measure_start(measure, model)}
            write_atomic(start_file, json.dumps(start, indent=2) + "\n")
        del model
        for seed in ctx.seeds:  # every seed asked for (one seed keeps the run names of one-seed folders)
            config = dict(
                model=ref,
                method="full",
                template="chatml",  # as `_loss_meter` measures (`auto` is SmolLM2's own template, with a system prompt)
                lr=args.lr,
                steps=steps,
                batch_size=sizes["batch_size"],
                seq_len=seq_len,
                seed=seed,
                eval_fraction=0.0,
                log_every=max(1, steps // 20),
                moe_aux_loss=0.01,
                warmup_steps=max(1, steps // 20),
                fused_norms="off" if quick else "auto",
            )
            run_name = name if len(ctx.seeds) == 1 else f"{name}-s{seed}"
            runs.append(
                Run(
                    run_name,
                    config,
                    records=train_records,
                    measure=measure,
                    measure_steps=points,
                    meta={"model": name, "seed": seed},
                )
            )
    results = ctx.run_all(runs)

    curves, rows = {}, []
    dense = start["dense"]
    for run_name, result in results.items():
        name = result["model"]
        metrics = [
            json.loads(line)
            for line in (ctx.run_dir(run_name) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        ]
        s = start[name]
        tokens, eval_s, curve = 0, 0.0, [(0, 0.0, 0.0, s["heldout_loss"])]
        for m in metrics:
            tokens += m["tokens"]
            eval_s += m.get("eval_seconds", 0.0)
            if "heldout_loss" in m:  # wall time without the held-out evaluations themselves
                curve.append(
                    (m["step"], m["elapsed_s"] - eval_s, 3 * s["fwd_flops_per_token"] * tokens, m["heldout_loss"])
                )
        curves[run_name] = curve
        last = [m for m in metrics if "expert_load" in m]
        rows.append(
            [
                run_name,
                result["seed"],
                s["params"] / 1e6,
                (s["params"] - dense["params"]) / 1e6,
                s["fwd_flops_per_token"] / 1e6,
                100 * (s["fwd_flops_per_token"] / dense["fwd_flops_per_token"] - 1),
                s["heldout_loss"],
                curve[-1][3],
                curve[-1][1],
                curve[-1][2] / 1e12,
                last[-1].get("moe_aux_loss") if last else None,
            ]
        )
    # per model: each point's numbers, mean over the seeds, and the spread (max - min) of the held-out loss
    mean_curves, spreads = {}, {}
    for name in models:
        own = [curves[n] for n, r in results.items() if r["model"] == name]
        mean_curves[name] = [
            (own[0][i][0], *(sum(c[i][j] for c in own) / len(own) for j in (1, 2, 3))) for i in range(len(own[0]))
        ]
        spreads[name] = [max(c[i][3] for c in own) - min(c[i][3] for c in own) for i in range(len(own[0]))]
    headers = [
        "run",
        "seed",
        "params (M)",
        "extra params (M)",
        "fwd MFLOPs/token",
        "extra FLOPs/token (%)",
        "held-out loss at start",
        "held-out loss at end",
        "train wall (s)",
        "train TFLOPs",
        "aux loss (last)",
    ]
    several = len(ctx.seeds) > 1

    def cell(name: str, i: int) -> str | float:
        mean = mean_curves[name][i][3]
        return f"{mean:.3f} ± {spreads[name][i] / 2:.3f}" if several else mean

    by_step = markdown_table(
        ["step"] + list(models), [[c[0]] + [cell(n, i) for n in models] for i, c in enumerate(mean_curves["dense"])]
    )
    plots = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
        for ax, col, label in zip(axes, (0, 1, 2), ("steps", "training wall time (s)", "training FLOPs")):
            for name, curve in mean_curves.items():
                ax.plot([c[col] for c in curve], [c[3] for c in curve], marker="o", label=name)
            ax.set_xlabel(label)
        axes[0].set_ylabel("held-out loss" + (f" (mean of {len(ctx.seeds)} seeds)" if several else ""))
        axes[0].legend()
        fig.suptitle("sparse upcycling vs dense continuation")
        ctx.keep_earlier_report()  # before the plot replaces its PNG
        save_figure(fig, ctx.out / "heldout_loss.png")
        plots.append("heldout_loss.png")
    except ImportError:
        pass
    ctx.finish(
        {
            "runs": results,
            "start": {k: v for k, v in start.items() if k != SETUP},
            "setup": start[SETUP],
            "curves": {n: [list(c) for c in cv] for n, cv in curves.items()},
            "mean_curves": {n: [list(c) for c in cv] for n, cv in mean_curves.items()},
            "heldout_loss_spread": spreads,
            "steps": steps,
        },
        [
            ("Cost and result per run", markdown_table(headers, rows)),
            (
                "Held-out loss by step (step 0 = before training"
                + (f"; mean over {len(ctx.seeds)} seeds ± half the spread)" if several else ")"),
                by_step,
            ),
        ],
        plots,
        notes=[
            "Wall time excludes the held-out evaluations. FLOPs = 3 x 2 x (parameters a token passes "
            "through) x trained tokens; attention's quadratic term omitted (equal for all runs)."
        ],
    )
