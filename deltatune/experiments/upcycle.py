"""Sparse upcycling vs dense continuation (arXiv 2212.05055, Fig. 2-3 in spirit).

From the same dense checkpoint, three runs train for the same steps on the same data (GSM8K train,
chat template, response-only loss; full finetuning, same lr schedule and seed): the dense model
("dense continuation"), and the model upcycled to E=4 and E=8 experts (top-2, raw softmax weights,
every other layer, load-balancing loss 0.01). Held-out loss (GSM8K test) is measured before
training and at evenly spaced steps, and reported against steps, wall time and training FLOPs
(3 x forward FLOPs per trained token; forward = 2 x parameters a token passes through, attention's
quadratic term left out, the same for all runs). The paper's shape: the upcycled model pulls ahead
of dense continuation at equal extra compute, after a visible start-up drop.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from deltatune.experiments.common import Context, Run, markdown_table, measure_points, save_figure, write_atomic

HELP = "sparse upcycling: dense continuation vs upcycled E=4/E=8 top-2, held-out loss vs steps, time and FLOPs"
DEFAULT_SEEDS = 1
GSM8K = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k"


def add_arguments(p) -> None:
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 120; quick 3)")
    p.add_argument("--experts", default="4,8", help="expert counts to upcycle to (default 4,8)")
    p.add_argument("--batch-size", type=int, default=4, help="packed rows per step (default 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per packed row (default 256)")
    p.add_argument("--lr", type=float, default=2e-5, help="learning rate of every run (default 2e-5)")
    p.add_argument("--eval-examples", type=int, default=64, help="held-out GSM8K test examples (default 64)")
    p.add_argument("--points", type=int, default=6, help="held-out measurements per run (default 6)")
    p.add_argument(
        "--normalize",
        action="store_true",
        help="renormalised top-2 weights (start equal to the dense model) instead of the raw softmax "
        "weights of the paper's decoder (start with every MoE layer's MLP scaled down)",
    )


def _records(quick: bool, n_eval: int) -> tuple[list[dict], list[dict]]:
    if quick:
        rows = [
            {"instruction": f"What is {a} + {b}?", "output": f"The answer is {a + b}."}
            for a in range(8)
            for b in range(8)
        ]
        return rows[8:], rows[:4]

    def read(name: str, limit: int | None = None) -> list[dict]:
        lines = (GSM8K / name).read_text(encoding="utf-8").splitlines()[:limit]
        return [{"instruction": r["question"], "output": r["answer"]} for r in map(json.loads, lines)]

    return read("train.jsonl"), read("test.jsonl", n_eval)


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


def run(ctx: Context, args) -> None:
    from deltatune.models import load_model

    quick = ctx.quick
    steps = args.steps or (3 if quick else 120)
    seq_len = 64 if quick else args.seq_len
    experts = [int(e) for e in str(args.experts).split(",") if e.strip()]
    train_records, eval_records = _records(quick, args.eval_examples)
    seed = ctx.seeds[0]
    base = ctx.model
    models = {"dense": base}
    for e in experts:
        models[f"upcycled-e{e}"] = _make_upcycled(base, e, ctx.out / "models" / f"upcycled-e{e}", args.normalize)

    # parameters, FLOPs per token and the held-out loss before training (kept for resume)
    start_file = ctx.out / "start.json"
    start = json.loads(start_file.read_text()) if start_file.exists() else {}
    points = measure_points(steps, 2 if quick else args.points)
    runs = []
    for name, ref in models.items():
        model, tok = load_model(ref)
        measure = _loss_meter(eval_records, tok, seq_len)
        if name not in start:
            params, fwd = _flops_per_token(model)
            start[name] = {"params": params, "fwd_flops_per_token": fwd, **measure(0, model)}
            write_atomic(start_file, json.dumps(start, indent=2) + "\n")
        del model
        config = dict(
            model=ref,
            method="full",
            lr=args.lr,
            steps=steps,
            batch_size=2 if quick else args.batch_size,
            seq_len=seq_len,
            seed=seed,
            eval_fraction=0.0,
            log_every=max(1, steps // 20),
            moe_aux_loss=0.01,
            warmup_steps=max(1, steps // 20),
            fused_norms="off" if quick else "auto",
        )
        runs.append(
            Run(name, config, records=train_records, measure=measure, measure_steps=points, meta={"model": name})
        )
    results = ctx.run_all(runs)

    curves, rows = {}, []
    dense = start["dense"]
    for name in models:
        metrics = [
            json.loads(line) for line in (ctx.run_dir(name) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
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
        curves[name] = curve
        last = [m for m in metrics if "expert_load" in m]
        rows.append(
            [
                name,
                s["params"] / 1e6,
                (s["params"] - dense["params"]) / 1e6,
                s["fwd_flops_per_token"] / 1e6,
                100 * (s["fwd_flops_per_token"] / dense["fwd_flops_per_token"] - 1),
                s["heldout_loss"],
                curve[-1][3],
                curve[-1][1],
                curve[-1][2] / 1e12,
                last[-1]["moe_aux_loss"] if last else None,
            ]
        )
    headers = [
        "run",
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
    by_step = markdown_table(
        ["step"] + list(models), [[c[0]] + [curves[n][i][3] for n in models] for i, c in enumerate(curves["dense"])]
    )
    plots = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
        for ax, col, label in zip(axes, (0, 1, 2), ("steps", "training wall time (s)", "training FLOPs")):
            for name, curve in curves.items():
                ax.plot([c[col] for c in curve], [c[3] for c in curve], marker="o", label=name)
            ax.set_xlabel(label)
        axes[0].set_ylabel("held-out loss")
        axes[0].legend()
        fig.suptitle("sparse upcycling vs dense continuation")
        save_figure(fig, ctx.out / "heldout_loss.png")
        plots.append("heldout_loss.png")
    except ImportError:
        pass
    ctx.finish(
        {
            "runs": results,
            "start": start,
            "curves": {n: [list(c) for c in cv] for n, cv in curves.items()},
            "steps": steps,
        },
        [
            ("Cost and result per run", markdown_table(headers, rows)),
            ("Held-out loss by step (step 0 = before training)", by_step),
        ],
        plots,
        notes=[
            "Wall time excludes the held-out evaluations. FLOPs = 3 x 2 x (parameters a token passes "
            "through) x trained tokens; attention's quadratic term omitted (equal for all runs)."
        ],
    )
