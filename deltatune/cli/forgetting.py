"""`deltatune forgetting`: what each run learned on target tasks and forgot on source tasks.

Evaluates the base model and every run on the same tasks, then writes into --out:
forgetting.md / forgetting.json (a table) and forgetting.png (learning on x, forgetting on y, one
labelled point per run).
"""

from __future__ import annotations

import json
from pathlib import Path

from deltatune.errors import UserError


def add_parser(subparsers) -> None:
    from deltatune.cli.eval import add_eval_options

    p = subparsers.add_parser("forgetting", help="learning on target tasks vs forgetting on source tasks, per run",
                              description=__doc__)
    p.add_argument("--base", default=None, help="base model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--run", action="append", required=True, help="run folder (repeat for several runs)")
    p.add_argument("--target", required=True, help="comma list of target tasks (what the runs trained for)")
    p.add_argument("--source", required=True, help="comma list of source tasks (what the base could already do)")
    p.add_argument("--out", required=True, help="output folder")
    add_eval_options(p)
    p.set_defaults(func=run)


def forgetting_markdown(base_scores: dict[str, float], rows: list[dict], targets: list[str],
                        sources: list[str]) -> str:
    from deltatune.cli.eval import format_table

    tasks = list(dict.fromkeys(targets + sources))
    table = [{"label": "base", "learning": 0.0, "forgetting": 0.0, **base_scores}] + rows
    return ("# Learning vs forgetting\n\n"
            f"learning = mean gain over base on {', '.join(targets)}; "
            f"forgetting = mean drop from base on {', '.join(sources)}.\n\n"
            + format_table(table, ["label", "learning", "forgetting", *tasks]) + "\n")


def run(args) -> int:
    from deltatune.analysis.plots import learn_forget_plot
    from deltatune.cli.eval import options_from_args, resolve_tasks, write_atomic
    from deltatune.evaluate.forgetting import learn_forget
    from deltatune.evaluate.runner import evaluate_task
    from deltatune.evaluate.runs import load_snapshot, read_run, unique_labels
    from deltatune.evaluate.tasks import load_items
    from deltatune.models import load_model, parse_dtype

    opts = options_from_args(args)
    targets = resolve_tasks(args.target, args.data_root, args.map)
    sources = resolve_tasks(args.source, args.data_root, args.map)
    tasks = list({t.name: t for t in targets + sources}.values())
    items = {t.name: load_items(t, opts.limit) for t in tasks}
    runs = [read_run(r) for r in args.run]
    for info in runs:
        if info.final is None:
            raise UserError(f"{info.path}: no final/ adapter or model (has training finished?)", field="run")
    labels = unique_labels(runs)
    base_model, tokenizer = load_model(args.base, dtype=args.dtype)

    lower_better: set[str] = set()

    def scores(model) -> dict[str, float]:
        out = {}
        for t in tasks:
            res = evaluate_task(model, tokenizer, t, opts, items[t.name])
            out[t.name] = res.score
            if not res.higher_is_better:
                lower_better.add(t.name)
        return out

    print("evaluating base model", flush=True)
    base_scores = scores(base_model)
    rows, details = [], {}
    for info, label in zip(runs, labels):
        print(f"evaluating {label} ({info.path})", flush=True)
        model = load_snapshot(base_model, info, info.final, parse_dtype(args.dtype))
        run_scores = scores(model)
        del model
        lf = learn_forget(label, base_scores, run_scores, [t.name for t in targets], [t.name for t in sources],
                          lower_better)
        rows.append(lf.as_row())
        details[label] = {"run": str(info.path), "method": info.method, "rank": info.rank, **lf.as_row()}
    out = Path(args.out)
    md = forgetting_markdown(base_scores, rows, [t.name for t in targets], [t.name for t in sources])
    payload = {"base": args.base or "default", "base_scores": base_scores, "targets": [t.name for t in targets],
               "sources": [t.name for t in sources], "limit": args.limit, "shots": args.shots, "runs": details}
    write_atomic(out / "forgetting.json", json.dumps(payload, indent=2) + "\n")
    write_atomic(out / "forgetting.md", md)
    learn_forget_plot(rows, out / "forgetting.png")
    print(md)
    print(f"wrote {out}/forgetting.md, forgetting.json, forgetting.png")
    return 0
