"""`deltatune preview --data FILE --template T --policy P [--format text|json]`: each token with its
segment and the loss weight it carries; coloured on a terminal, plain when piped, JSON for machines.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by `preview` and `stats`: which data, how to read it, which tokenizer."""
    p.add_argument("--data", required=True, help="JSONL, JSON, Parquet or CSV file")
    p.add_argument(
        "--template",
        default="auto",
        help="auto (the model's own chat template if it has one, else chatml where its vocabulary has ChatML's tokens, else alpaca), tokenizer, chatml, alpaca or raw",
    )
    p.add_argument("--data-format", default="auto", help="auto, alpaca, chat, prompt or text")
    p.add_argument(
        "--map",
        dest="column_map",
        default=None,
        metavar="A=B,C=D",
        help="rename fields, e.g. question=instruction,answer=output",
    )
    p.add_argument("--model", default=None, help="model whose tokenizer to use (default: the default model)")
    p.add_argument("--tokenizer", default=None, help=argparse.SUPPRESS)  # "tiny": the hermetic test tokenizer
    p.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="examples longer than this are truncated or dropped (default: `deltatune train`'s default seq_len)",
    )
    p.add_argument("--overflow", default="truncate", choices=["truncate", "drop"])
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping")
    p.add_argument("--system-prompt", default=None, help="system prompt for records that have none")
    p.add_argument("--format", dest="output_format", default="text", choices=["text", "json"])


def default_seq_len() -> int:
    """`deltatune train`'s default seq_len, so that preview and stats show the data as default training cuts it
    (read when the command runs: importing the config at parser time would slow every command)."""
    from deltatune.config import TrainConfig

    return int(TrainConfig.model_fields["seq_len"].default)


def resolve_max_len(args: argparse.Namespace) -> int:
    """--max-len, or train's default; a ConfigError below 2 (no token would be left to train)."""
    from deltatune.errors import ConfigError

    if args.max_len is None:
        args.max_len = default_seq_len()
    if args.max_len < 2:
        raise ConfigError(f"must be at least 2, got {args.max_len}", field="--max-len")
    return args.max_len


def load_tokenizer_from_args(args: argparse.Namespace):
    if args.tokenizer == "tiny":
        from deltatune.testing import tiny_tokenizer

        return tiny_tokenizer()
    from deltatune.models import load_tokenizer

    return load_tokenizer(args.model)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "preview",
        help="show each token's segment and loss weight under a policy",
        description="Show each token with its segment and the loss weight a policy gives it.",
    )
    add_data_arguments(p)
    p.add_argument(
        "--policy",
        default="response",
        help="response, instruction, no-boilerplate, all, weighted:λ; options ,template=λ_t ,turns=last ,system=yes; "
        "two-phase FIRST->THEN@STEPS (or @Nep)",
    )
    p.add_argument("--limit", type=int, default=3, help="how many examples to show")
    p.add_argument("--color", default="auto", choices=["auto", "always", "never"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deltatune.data.masking import PolicySchedule, parse_policy, turns_trained, unused_template_weight
    from deltatune.data.pipeline import no_examples_message, prepare_dataset
    from deltatune.data.preview import to_json, to_text
    from deltatune.errors import ConfigError, DataError

    if args.limit < 1:
        raise ConfigError(f"must be at least 1, got {args.limit}", field="--limit")
    resolve_max_len(args)
    policy = parsed = parse_policy(args.policy)
    note = ""
    if isinstance(policy, PolicySchedule):
        note = f"(two-phase '{policy}': showing the first phase; preview '{policy.then}' for the second)\n"
        policy = policy.first
    tokenizer = load_tokenizer_from_args(args)
    data = prepare_dataset(
        args.data,
        tokenizer,
        template=args.template,
        data_format=args.data_format,
        column_map=args.column_map,
        max_len=args.max_len,
        overflow=args.overflow,
        skip_bad=args.skip_bad,
        system_prompt=args.system_prompt,
        limit=args.limit,
        turns=turns_trained(parsed),  # as training prepares it: drops the examples training drops
        keep_offsets=True,
    )
    if not data.examples:
        raise DataError(no_examples_message(args.data, data.report))
    warning = unused_template_weight(data.examples, parsed, data.template)
    if warning:
        print(warning, file=sys.stderr)
    if args.output_format == "json":
        sys.stdout.write(to_json(data.examples, tokenizer, policy) + "\n")
        return 0
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    sys.stdout.write(note + to_text(data.examples, tokenizer, policy, colour=colour))
    sys.stdout.flush()
    print(f"({data.report.summary()})", file=sys.stderr)
    return 0
