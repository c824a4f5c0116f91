"""`deltatune` command line: one module per command in this package, each with `add_parser`.

A command module defines `add_parser(subparsers)` that registers its sub-parser and sets
`func=run` where `run(args) -> int`. User mistakes raise `UserError` and become one line on
stderr with exit code 2; nothing else is caught, so real bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from deltatune.errors import TrainingError, UserError

# Order here is the order in `deltatune --help`.
COMMANDS = [
    "demo",
    "train",
    "generate",
    "merge",
    "export",
    "plan",
    "preview",
    "stats",
    "eval",
    "forgetting",
    "analyze",
    "experiment",
    "data",
    "upcycle",
    "serve",
]


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit 2), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="deltatune", description="Instruction finetuning with delta-tuning methods, and what each choice costs."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"deltatune.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"deltatune.cli.{name}":
                continue  # command not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given (experiment --jobs restarts it)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        from deltatune.experiments.common import WORKER_ENV

        worker = os.environ.get(WORKER_ENV, "").split("/")[0]  # an experiment's --jobs worker
        print(f"{f'(worker {worker}) ' if worker else ''}deltatune {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except TrainingError as exc:
        print(f"deltatune {args.command}: stopped: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"deltatune {args.command}: interrupted", file=sys.stderr)
        return 130
