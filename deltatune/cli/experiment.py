"""`deltatune experiment NAME [--quick] [--out DIR] [--seeds N] [options]`: reproduce a paper's claim.

Adding an experiment is one module plus one line in EXPERIMENTS below. The module
`deltatune/experiments/NAME.py` defines:

    HELP = "one line for --help"
    DEFAULT_SEEDS = 2                      # how many seeds without --seeds
    def add_arguments(parser) -> None      # its own options (their values become the run's settings)
    def run(ctx: Context, args) -> None    # build Runs, ctx.run_all(runs), then ctx.finish(...)

`ctx` (deltatune.experiments.common.Context) already holds the output folder (claimed, or
resumed), quick mode, the seeds and the model; see docs/experiments.md ("How experiments work").
"""

from __future__ import annotations

import argparse
import importlib

# name -> module; the order is the order in --help
EXPERIMENTS = {
    "memorize": "deltatune.experiments.memorize",
    "masking": "deltatune.experiments.masking",
    "upcycle": "deltatune.experiments.upcycle",
    "learn-forget": "deltatune.experiments.learn_forget",
}


def _load(name: str):
    try:
        return importlib.import_module(EXPERIMENTS[name])
    except ModuleNotFoundError as exc:
        if exc.name == EXPERIMENTS[name]:
            return None  # registered but not built yet
        raise


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "experiment",
        help="reproduce a paper's finding on your model (memorize, masking, ...)",
        description="Run one experiment: a set of ordinary training runs, measured and tabulated. "
        "A killed experiment resumes where it stopped when run again with the same "
        "options. See docs/experiments.md.",
    )
    experiments = p.add_subparsers(dest="experiment", metavar="NAME")
    for name in EXPERIMENTS:
        module = _load(name)
        if module is None:
            continue
        e = experiments.add_parser(name, help=module.HELP, description=module.HELP)
        e.add_argument(
            "--quick",
            action="store_true",
            help="tiny random model and small sizes: the whole pipeline in seconds (tests)",
        )
        e.add_argument("--out", default=None, help="output folder (default: experiments/NAME[-quick])")
        e.add_argument(
            "--seeds", type=int, default=None, help=f"number of seeds, 0..N-1 (default {module.DEFAULT_SEEDS})"
        )
        e.add_argument("--model", default=None, help="model to use instead of the default (or the quick model)")
        e.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
        e.add_argument("--quiet", action="store_true", help="no progress lines")
        own = e.add_argument_group(f"{name} options")
        before = {a.dest for a in e._actions}
        module.add_arguments(own)
        e.set_defaults(
            func=run, experiment_module=module, experiment_settings=[a.dest for a in e._actions if a.dest not in before]
        )
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run(args: argparse.Namespace) -> int:
    import torch

    from deltatune.experiments.common import Context, seed_list

    module = args.experiment_module
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or f"experiments/{args.experiment}{'-quick' if args.quick else ''}"
    settings = {k: getattr(args, k) for k in args.experiment_settings}
    if args.model:
        settings["model"] = args.model
    seeds = seed_list(args.seeds if args.seeds is not None else module.DEFAULT_SEEDS)
    ctx = Context(
        args.experiment,
        out,
        quick=args.quick,
        seeds=seeds,
        settings=settings,
        selectors=getattr(module, "RUN_SELECTORS", ()),
        model=args.model,
        quiet=args.quiet,
    )
    module.run(ctx, args)
    return 0
