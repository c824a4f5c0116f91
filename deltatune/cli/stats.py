"""`deltatune stats --data FILE ...`: lengths, the instruction/response ratio, truncation, padding waste
packed vs padded, and which loss policy the Instruction Modelling paper's findings suggest, with numbers.
"""

from __future__ import annotations

import argparse
import json
import sys

from deltatune.cli.preview import add_data_arguments, load_tokenizer_from_args, resolve_max_len


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats",
        help="dataset lengths, truncation, padding waste and loss-policy advice",
        description="Statistics of an instruction dataset and advice on the loss policy.",
    )
    add_data_arguments(p)
    p.add_argument("--seq-len", type=int, default=None, help="packed row length (default: --max-len)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size for the padded-batching comparison")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deltatune.data.pipeline import no_examples_message, prepare_dataset
    from deltatune.data.stats import advise, dataset_stats, format_stats
    from deltatune.errors import ConfigError, DataError

    resolve_max_len(args)
    if args.batch_size < 1:
        raise ConfigError(f"must be at least 1, got {args.batch_size}", field="--batch-size")
    if args.seq_len is not None and args.seq_len < args.max_len:
        raise ConfigError(f"must be at least --max-len ({args.max_len}), got {args.seq_len}", field="--seq-len")
    tokenizer = load_tokenizer_from_args(args)
    # Read without truncation, so that what --max-len would cut can be counted.
    data = prepare_dataset(
        args.data,
        tokenizer,
        template=args.template,
        data_format=args.data_format,
        column_map=args.column_map,
        max_len=10**9,
        skip_bad=args.skip_bad,
        system_prompt=args.system_prompt,
    )
    if not data.examples:  # no lengths, no ratio: advice would be made up
        raise DataError(no_examples_message(args.data, data.report))
    stats = dataset_stats(
        data.examples,
        max_len=args.max_len,
        seq_len=args.seq_len or args.max_len,
        batch_size=args.batch_size,
        overflow=args.overflow,
    )
    if not stats["examples_trained"]:  # advice on a policy and a dataset size for nothing that trains
        raise DataError(
            f"none of its {stats['examples']} examples would train at --max-len {args.max_len} "
            f"(--overflow {args.overflow}): {stats['would_truncate']} are longer, "
            f"{stats['would_lose_whole_response']} of them with no response token left; raise --max-len",
            file=str(args.data),
        )
    if args.output_format == "json":
        out = {
            "report": vars(data.report),
            "template": data.template,
            "data_format": data.data_format,
            **stats,
            "advice": advise(stats, data.template),
        }
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
    else:
        sys.stdout.write(format_stats(stats, data.report.summary(), data.template))
    return 0
