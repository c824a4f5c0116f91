"""`deltatune demo`: a short LoRA finetune of the default model with a before/after table."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="teach the default model a new task in a few minutes and show before/after")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--train-examples", type=int, default=800)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 2 epochs)")
    p.add_argument("--model", default=None)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a training run in --output (the demo's own is replaced anyway)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deltatune.demo import run_demo

    run_demo(
        output=args.output,
        n_train=args.train_examples,
        steps=args.steps,
        model_name=args.model,
        overwrite=args.overwrite,
    )
    return 0
