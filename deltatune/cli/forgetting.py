"""`deltatune forgetting`: what each run learned on target tasks and forgot on source tasks.

Evaluates the base model and every run on the same tasks, then writes into --out:
forgetting.md / forgetting.json and forgetting.png (learning on x, forgetting on y, one labelled
point per run). Learning and forgetting average fraction-valued metrics only (accuracy, exact
match, pass@k); loss: tasks get their own table (base, run, change in nats), never averaged in.
A run is a training run folder, an adapter folder or a full model folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from deltatune.errors import UserError


def add_parser(subparsers) -> None:
    from deltatune.cli.eval import add_eval_options

    p = subparsers.add_parser(
        "forgetting", help="learning on target tasks vs forgetting on source tasks, per run", description=__doc__
    )
    p.add_argument(
        "--base",
        default=None,
        help="base model (default: the one the runs were trained from, by their config.yaml or adapter config)",
    )
    p.add_argument(
        "--run",
        action="append",
        required=True,
        help="run folder, adapter folder or model folder (repeat for several runs)",
    )
    p.add_argument("--target", required=True, help="comma list of target tasks (what the runs trained for)")
    p.add_argument("--source", required=True, help="comma list of source tasks (what the base could already do)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace forgetting.* files already in --out")
    add_eval_options(p)
    p.set_defaults(func=run)


OUTPUTS = ("forgetting.json", "forgetting.md", "forgetting.png")


def check_out_folder(out: str, overwrite: bool, outputs: tuple[str, ...] = OUTPUTS) -> None:
    """Before any model loads (the evaluation can take hours): --out can be a folder we write, and holds no
    earlier results (any of `outputs`) unless --overwrite."""
    from deltatune.fileio import check_writable

    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{out} exists and is not a folder", field="out")
    check_writable(folder, field="out")
    earlier = [name for name in outputs if (folder / name).exists()]
    if earlier and not overwrite:
        raise UserError(
            f"{folder / earlier[0]} exists (earlier results); choose another folder or pass --overwrite to replace it",
            field="out",
        )


def base_of_runs(runs: list, given: str | None, measured: str = "its learning and forgetting are") -> str | None:
    """The base to compare the runs against: `given` (a warning for each run trained from another), else the one
    the runs were trained from. Runs from different bases are refused: one base row cannot describe them. It
    compared every run against the default model, whatever the run had been trained from."""
    import sys

    from deltatune.models import same_model

    def name(b: str | None) -> str:
        return b or "the default model"

    known = [(info, b) for info in runs for says, b in [info.recorded_base] if says]
    if given is not None:
        for info, b in known:
            if not same_model(given, b):
                print(
                    f"warning: {info.path} was trained from {name(b)}, not {given}; {measured} measured against a "
                    "base it did not start from",
                    file=sys.stderr,
                )
        return given
    if not known:
        print(
            "note: no run says which base it was trained from; comparing with the default model (--base)",
            file=sys.stderr,
        )
        return None
    first_info, first = known[0]
    for info, b in known[1:]:
        if not same_model(first, b):
            raise UserError(
                f"{first_info.path} was trained from {name(first)} and {info.path} from {name(b)}: compare runs of "
                "one base per call, or pass --base",
                field="run",
            )
    return first


def check_adapters_fit(base_model, runs: list) -> None:
    """Each adapter run's tensors against the base, on a shapes-only copy: a mismatch is found before the base
    model is scored, not after."""
    from deltatune.methods.apply import check_adapter_tensors
    from deltatune.methods.peft_format import read_adapter

    for info in runs:
        if info.final.kind == "adapter":
            specs, state, peft_keys, source = read_adapter(info.final.path)
            check_adapter_tensors(base_model, specs, state, peft_keys=peft_keys is not None, source=source)
        elif info.final.kind == "model":
            check_model_folder_fits(base_model, info.final.path)


def check_model_folder_fits(base_model, folder: Path) -> None:
    """A model folder's weights files are readable and their tensors have the base's shapes (headers only, no
    weights read): a damaged or other model was found after the base and every earlier run had been scored."""
    from deltatune.fileio import safetensors_header

    shapes = {name: tuple(t.shape) for name, t in base_model.state_dict().items()}
    for path in sorted(folder.glob("*.safetensors")):
        found = {key: shape for key, (_, shape) in safetensors_header(path, field="run").items()}
        for key, shape in shapes.items():  # in the model's order: the first layer that differs is named
            if key in found and found[key] != shape:
                raise UserError(
                    f"{path}: tensor '{key}' has shape {found[key]}, the base {shape}: not trained from this base",
                    field="run",
                )


def metric_names(results: dict[str, str], tasks: list[str], loss_tasks: set[str]) -> str:
    """'exact_match' or 'acc / exact_match': the headline metrics averaged, for table text and axes."""
    names = list(dict.fromkeys(results[t] for t in tasks if t not in loss_tasks))
    return " / ".join(names) if names else "(none)"


def forgetting_markdown(
    base_scores: dict[str, float],
    rows: list[dict],
    targets: list[str],
    sources: list[str],
    loss_rows: list[dict] | None = None,
    metrics: dict[str, str] | None = None,
    loss_tasks: set[str] | None = None,
) -> str:
    from deltatune.cli.eval import format_table

    loss_tasks = loss_tasks or set()
    metrics = metrics or {}
    frac = [t for t in dict.fromkeys(targets + sources) if t not in loss_tasks]
    ft = [t for t in targets if t not in loss_tasks]
    fs = [t for t in sources if t not in loss_tasks]
    table = [{"label": "base", "learning": 0.0, "forgetting": 0.0, **{t: base_scores[t] for t in frac}}] + rows
    header = [f"{t} ({metrics[t]})" if t in metrics else t for t in frac]
    table = [{**r, **{h: r.get(t) for h, t in zip(header, frac)}} for r in table]
    text = (
        "# Learning vs forgetting\n\n"
        f"learning = mean gain over base on {', '.join(ft) or '(no fraction-valued target)'}; "
        f"forgetting = mean drop from base on {', '.join(fs) or '(no fraction-valued source)'}. "
        "Both are fractions of items (0.01 = one point), averaged over tasks' headline metrics.\n\n"
        + format_table(table, ["label", "learning", "forgetting", *header])
        + "\n"
    )
    if loss_rows:
        base_rows = [
            {"label": "base", "task": t, "base": base_scores[t], "run": base_scores[t], "change": 0.0}
            for t in dict.fromkeys(targets + sources)
            if t in loss_tasks
        ]
        text += (
            "\n## Held-out loss (nats per token; change = run - base, positive is worse)\n\n"
            "Never averaged with the fractions above.\n\n"
            + format_table(base_rows + loss_rows, ["label", "task", "base", "run", "change"])
            + "\n"
        )
    return text


def run(args) -> int:
    from deltatune.analysis.plots import learn_forget_plot
    from deltatune.cli.eval import options_from_args, resolve_tasks, write_atomic
    from deltatune.evaluate.forgetting import learn_forget
    from deltatune.evaluate.runner import check_choice_fits, check_task_options, evaluate_task
    from deltatune.evaluate.runs import load_snapshot, read_run, snapshot_tokenizer, unique_labels
    from deltatune.evaluate.tasks import load_items
    from deltatune.fileio import strict_json
    from deltatune.models import load_model, parse_dtype

    opts = options_from_args(args)
    targets = resolve_tasks(args.target, args.data_root, args.map)
    sources = resolve_tasks(args.source, args.data_root, args.map)
    check_out_folder(args.out, getattr(args, "overwrite", False))
    tasks = list({t.name: t for t in targets + sources}.values())
    for t in tasks:
        if t.kind == "code":
            from deltatune.evaluate.runner import check_code_options

            check_code_options(opts, t, generating=True)  # before any model loads
    items = {t.name: load_items(t, opts.limit) for t in tasks}
    for t in tasks:  # shots, loss policy and template, before the base model and every run are evaluated
        check_task_options(t, items[t.name], opts)
    runs = [read_run(r) for r in args.run]
    for info in runs:
        if info.final is None:
            raise UserError(f"{info.path}: no final/ adapter or model (has training finished?)", field="run")
    labels = unique_labels(runs)
    base = base_of_runs(runs, args.base)
    base_model, tokenizer = load_model(base, dtype=args.dtype)
    check_adapters_fit(base_model, runs)  # before the base is scored (hours on real tasks)
    for t in tasks:  # options the model's context cannot hold, likewise
        check_choice_fits(base_model, tokenizer, t, items[t.name], opts)

    loss_tasks: set[str] = set()
    metrics: dict[str, str] = {}

    def scores(model, tokenizer) -> dict[str, float]:
        out = {}
        for t in tasks:
            res = evaluate_task(model, tokenizer, t, opts, items[t.name])
            out[t.name] = res.score
            metrics[t.name] = res.metric
            if not res.higher_is_better:
                loss_tasks.add(t.name)
        return out

    print("evaluating base model", flush=True)
    base_scores = scores(base_model, tokenizer)
    rows, loss_rows, details = [], [], {}
    for info, label in zip(runs, labels):
        print(f"evaluating {label} ({info.path})", flush=True)
        model = load_snapshot(base_model, info, info.final, parse_dtype(args.dtype))
        run_scores = scores(model, snapshot_tokenizer(info.final, tokenizer))
        del model
        lf = learn_forget(
            label, base_scores, run_scores, [t.name for t in targets], [t.name for t in sources], loss_tasks
        )
        rows.append(lf.as_row())
        loss_rows += lf.loss_rows()
        details[label] = {
            "run": str(info.path),
            "method": info.method,
            "rank": info.rank,
            **lf.as_row(),
            "losses": lf.losses,
        }
    out = Path(args.out)
    tnames, snames = [t.name for t in targets], [t.name for t in sources]
    md = forgetting_markdown(base_scores, rows, tnames, snames, loss_rows, metrics, loss_tasks)
    payload = {
        "base": base or "default",
        "base_scores": base_scores,
        "targets": tnames,
        "sources": snames,
        "metrics": metrics,
        "loss_tasks": sorted(loss_tasks),
        "units": "fraction of items",
        "limit": args.limit,
        "shots": args.shots,
        "dtype": args.dtype,
        "batch_size": args.batch_size,  # bf16 greedy texts change with it (docs/evaluation.md)
        "runs": details,
    }
    write_atomic(out / "forgetting.json", json.dumps(strict_json(payload), indent=2) + "\n")  # NaN: null
    write_atomic(out / "forgetting.md", md)
    learn_forget_plot(
        rows,
        out / "forgetting.png",
        x_unit=metric_names(metrics, tnames, loss_tasks),
        y_unit=metric_names(metrics, snames, loss_tasks),
    )
    print(md)
    print(f"wrote {out}/forgetting.md, forgetting.json, forgetting.png")
    return 0
