"""`deltatune experiment NAME [--quick] [--out DIR] [--seeds N] [options]`: reproduce a paper's claim.

Adding an experiment is one module plus one line in EXPERIMENTS below. The module
`deltatune/experiments/NAME.py` defines:

    HELP = "one line for --help"
    DEFAULT_SEEDS = 2                      # how many seeds without --seeds
    def add_arguments(parser) -> None      # its own options (their values become the run's settings)
    def run(ctx: Context, args) -> None    # build Runs, ctx.run_all(runs), then ctx.finish(...)
    def check_arguments(args) -> None      # optional: refuse bad options before the folder is claimed
    PARALLEL_RUNS = True                   # optional: offer --jobs (run() must let a worker, ctx.worker > 0,
                                           # return after its run_all calls; ctx.finish is a no-op there)

`ctx` (deltatune.experiments.common.Context) already holds the output folder (claimed, or
resumed), quick mode, the seeds and the model; see docs/experiments.md ("How experiments work").
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

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
        if getattr(module, "PARALLEL_RUNS", False):
            e.add_argument(
                "--jobs",
                type=int,
                default=1,
                help="train this many runs at once, in separate processes sharing the threads (default 1); "
                "on 2 cores two one-thread processes did 1.36x the work of one two-thread process",
            )
        own = e.add_argument_group(f"{name} options")
        before = {a.dest for a in e._actions}
        module.add_arguments(own)
        e.set_defaults(
            func=run, experiment_module=module, experiment_settings=[a.dest for a in e._actions if a.dest not in before]
        )
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _worker_argv(argv: list[str], threads: int) -> list[str]:
    """The invocation's own arguments for a worker: without --jobs, with its share of the threads."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--jobs", "--threads"):
            skip = True
        elif not a.startswith(("--jobs=", "--threads=")):
            out.append(a)
    return [*out, "--threads", str(threads)]


def _end_with_parent() -> None:
    """In a worker (Linux): the kernel sends it SIGTERM when the invoking process dies, however it dies.
    Elsewhere, and if the parent died before this call, the worker stops at its next claim
    (`worker_orphaned`)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        pass


def _start_workers(args: argparse.Namespace, jobs: int, threads: int, into: list) -> None:
    from deltatune.experiments.common import WORKER_ENV

    argv = _worker_argv(args.argv, threads)
    for k in range(1, jobs):
        into.append(
            subprocess.Popen(
                [sys.executable, "-m", "deltatune", *argv],
                env={**os.environ, WORKER_ENV: f"{k}/{jobs}/{os.getpid()}"},
                stdin=subprocess.DEVNULL,
            )
        )


def run(args: argparse.Namespace) -> int:
    import torch

    from deltatune.errors import UserError
    from deltatune.experiments.common import Context, seed_list, worker_index

    module = args.experiment_module
    worker, jobs = worker_index()
    if worker and sys.platform.startswith("linux"):
        _end_with_parent()
    if not worker:
        jobs = getattr(args, "jobs", 1)
        if jobs < 1:
            raise UserError("--jobs must be at least 1")
        if jobs > 1 and sys.platform == "win32":  # the run claims are POSIX file locks
            raise UserError("--jobs needs POSIX file locks (Linux, macOS); run with --jobs 1")
        if jobs > (os.cpu_count() or 1):  # each process holds its own copy of the model
            raise UserError(f"--jobs {jobs} is more than the {os.cpu_count()} cores here")
    if args.threads is not None and args.threads < 1:  # before torch is asked for them (a traceback there)
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    threads = args.threads or torch.get_num_threads()
    if jobs > 1 and not worker:
        threads = max(1, threads // jobs)  # the cores are shared: each process gets its part
    if args.threads or jobs > 1:
        torch.set_num_threads(threads)
    out = args.out or f"experiments/{args.experiment}{'-quick' if args.quick else ''}"
    settings = {k: getattr(args, k) for k in args.experiment_settings}
    for key, value in settings.items():  # every count an experiment takes (steps, ranks, sizes) is positive;
        if type(value) is int and value < 1:  # 0 must not fall back to the default as a falsy value would
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {value}")
    if hasattr(module, "check_arguments"):
        module.check_arguments(args)
    if hasattr(module, "defining_settings"):  # defaults that decide the results (sizes), so a changed default
        settings.update(module.defining_settings(args))  # refuses an old folder instead of mixing its runs
    if args.model:
        settings["model"] = args.model
    seeds = seed_list(args.seeds if args.seeds is not None else module.DEFAULT_SEEDS)
    new_folder = not Path(out).exists()
    ctx = Context(
        args.experiment,
        out,
        quick=args.quick,
        seeds=seeds,
        settings=settings,
        selectors=getattr(module, "RUN_SELECTORS", ()),
        model=args.model,
        quiet=args.quiet,
        worker=worker,
        jobs=jobs,
    )
    workers: list[subprocess.Popen] = []
    if jobs > 1 and not worker:  # started at the experiment's first claim, once its options have been checked
        ctx.before_first_claim = lambda: _start_workers(args, jobs, threads, workers)
    try:
        module.run(ctx, args)
    except UserError:
        if new_folder and not worker and not (Path(out) / "runs").exists():
            shutil.rmtree(out, ignore_errors=True)  # refused before any run: leave no folder behind
        for proc in workers:
            proc.terminate()
        raise
    except BaseException:
        for proc in workers:  # this process failed or was interrupted: its workers stop too
            proc.terminate()
        raise
    finally:
        failed = [k for k, proc in enumerate(workers, 1) if proc.wait() != 0]
    if failed:  # every run is done (this process took over what a failed worker left), but say so
        print(
            f"deltatune experiment: worker {', '.join(map(str, failed))} exited with an error (see above)",
            file=sys.stderr,
        )
    return 0
