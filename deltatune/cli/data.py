"""`deltatune data SUBCOMMAND`: make instruction data that `deltatune train` reads as it is.

from-labels (labelled file + phrasings -> Alpaca), self-instruct (bootstrap tasks with a model),
filter (exact / near duplicates, token lengths) and mix (a seeded mixture of files). Every subcommand
writes its --out atomically and refuses to replace an existing file without --overwrite.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="make instruction data: from labelled files, Self-Instruct, filter, mix",
        description="Make instruction data that `deltatune train` reads directly.",
    )
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    f = dsub.add_parser(
        "from-labels",
        help="labelled file + task phrasings -> Alpaca records",
        description="Turn a labelled JSONL/CSV/Parquet file into Alpaca records, one task phrased "
        "several ways (round-robin, or drawn with --seed).",
    )
    f.add_argument("--data", required=True, help="labelled file: JSONL, JSON, CSV or Parquet")
    f.add_argument("--task", required=True, help="task YAML: name, templates (phrasings), labels (label -> word)")
    f.add_argument("--label", default="label", help="the label column (default: label)")
    f.add_argument("--map", dest="column_map", default=None, metavar="A=B,C=D", help="rename the file's columns")
    f.add_argument("--per-example", type=int, default=1, metavar="K", help="K distinct phrasings per example")
    f.add_argument("--seed", type=int, default=None, help="draw phrasings with this seed (default: round-robin)")
    _out_arguments(f)
    f.set_defaults(func=run_from_labels)

    s = dsub.add_parser(
        "self-instruct",
        help="bootstrap new tasks from seed tasks with a model (Self-Instruct)",
        description="The Self-Instruct bootstrap: generate instructions from seed and generated "
        "tasks, classify them, generate instances, keep diverse ones (ROUGE-L < 0.7).",
    )
    s.add_argument("--model", default=None, help="model folder, hub id or .gguf (default: SmolLM2-135M-Instruct)")
    s.add_argument("--seeds", required=True, help="seed tasks, JSONL as self-instruct's seed_tasks.jsonl")
    s.add_argument("--n", type=int, required=True, help="how many new tasks to keep")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (prompts and decoding)")
    s.add_argument("--prompts-per-round", type=int, default=4, help="instruction-generation prompts per round")
    s.add_argument("--max-rounds", type=int, default=None, help="stop after this many rounds (default: 20 * n)")
    s.add_argument("--rouge", type=float, default=0.7, help="keep an instruction only below this ROUGE-L")
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    s.add_argument("--work", default=None, help="progress folder (default: OUT.work); kept for --resume")
    s.add_argument("--resume", action="store_true", help="continue the run recorded in the progress folder")
    s.add_argument("--dtype", default="fp32")
    _out_arguments(s)
    s.set_defaults(func=run_self_instruct)

    t = dsub.add_parser(
        "filter",
        help="remove exact and near duplicates, enforce token lengths",
        description="Drop exact and near-duplicate records (MinHash or ROUGE-L) and records "
        "outside token length limits; report what was dropped and why.",
    )
    t.add_argument("--data", required=True, help="instruction file: JSONL, JSON, CSV or Parquet")
    t.add_argument("--map", dest="column_map", default=None, metavar="A=B,C=D", help="rename the file's columns")
    t.add_argument("--near", default="minhash", choices=["minhash", "rouge", "none"], help="near-duplicate test")
    t.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="near-duplicate threshold: estimated Jaccard of word 3-grams (minhash, default 0.8) "
        "or ROUGE-L F (rouge, default 0.7)",
    )
    t.add_argument(
        "--on",
        default="prompt",
        choices=["prompt", "all"],
        help="compare the prompt (instruction + input; the user's messages, not a shared system prompt) or the "
        "whole record",
    )
    t.add_argument("--model", default=None, help="tokenizer for the length limits (default: the default model)")
    t.add_argument("--tokenizer", default=None, help=argparse.SUPPRESS)  # "tiny": the hermetic test tokenizer
    t.add_argument("--min-response-tokens", type=int, default=None)
    t.add_argument("--max-response-tokens", type=int, default=None)
    t.add_argument("--max-prompt-tokens", type=int, default=None)
    t.add_argument("--report", default=None, help="also write the report as JSON here")
    _out_arguments(t)
    t.set_defaults(func=run_filter)

    m = dsub.add_parser(
        "mix",
        help="a seeded mixture: A.jsonl:0.7 B.jsonl:0.3 --n N",
        description="Sample N records from several files in the given proportions, with a seed.",
    )
    m.add_argument("sources", nargs="+", metavar="FILE:WEIGHT", help="files and their weights")
    m.add_argument("--n", type=int, required=True, help="records in the mixture")
    m.add_argument("--seed", type=int, default=0)
    _out_arguments(m)
    m.set_defaults(func=run_mix)

    p.set_defaults(func=lambda args: _help(p))


def _out_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output JSONL (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def _help(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2


def run_from_labels(args: argparse.Namespace) -> int:
    from deltatune.data.instructions.from_labels import build_from_labels, load_task
    from deltatune.data.instructions.output import check_output, write_jsonl_atomic

    out = check_output(args.out, [args.data, args.task], args.overwrite)
    task = load_task(args.task)
    records, report = build_from_labels(
        args.data,
        task,
        label_column=args.label,
        column_map=args.column_map,
        per_example=args.per_example,
        seed=args.seed,
    )
    write_jsonl_atomic(out, records)
    sys.stdout.write(report.format(task))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def run_self_instruct(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deltatune.data.instructions.output import check_output
    from deltatune.data.instructions.self_instruct import (
        WORK_FILES,
        SelfInstructConfig,
        model_generator,
        run_self_instruct,
        write_outputs,
    )
    from deltatune.data.instructions.self_instruct_text import read_seed_tasks
    from deltatune.errors import ConfigError, UserError
    from deltatune.fileio import check_writable, overlaps
    from deltatune.models import load_model

    out = check_output(args.out, [args.seeds], args.overwrite)
    work = Path(args.work) if args.work else out.with_name(out.name + ".work")
    if overlaps(out, work):  # written at the end: over the run's own files, or onto the folder (after every round)
        what = f"the run's own {out.name} in --work" if out.name in WORK_FILES else "--work or inside it"
        raise UserError(f"is {what}; choose another --out", file=str(out))
    check_writable(work, field="--work")  # before the model loads, not when the first round is recorded
    config = SelfInstructConfig(
        n=args.n,
        seed=args.seed,
        prompts_per_round=args.prompts_per_round,
        rouge_threshold=args.rouge,
        max_rounds=args.max_rounds,
    )
    config.check()
    if args.max_new_tokens < 1:  # before the model loads
        raise ConfigError(f"must be at least 1, got {args.max_new_tokens}", field="--max-new-tokens")
    if not 0 <= args.temperature < float("inf"):  # a negative one decoded greedily, silently
        raise ConfigError(f"must be 0 (greedy) or more, got {args.temperature}", field="--temperature")
    seeds = read_seed_tasks(args.seeds)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    generate = model_generator(model, tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    generation = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "dtype": args.dtype}
    result = run_self_instruct(
        seeds,
        generate,
        config,
        work,
        model_name=args.model,
        generation=generation,
        resume=args.resume,
        progress=sys.stderr.isatty(),
    )
    if not result.records():  # an empty --out would train nothing and fail later, far from the cause
        write_outputs(result, None, work)
        sys.stdout.write(result.format())
        raise UserError(f"no instruction was kept (drops per reason in {work / 'report.json'}); {out} not written")
    written = write_outputs(result, out, work)
    sys.stdout.write(result.format())
    print(f"wrote {out} ({written} records); tasks and report in {work}", file=sys.stderr)
    return 0


def run_filter(args: argparse.Namespace) -> int:
    from deltatune.data.instructions.filter import FilterOptions, filter_records
    from deltatune.data.instructions.output import check_output, write_json_atomic, write_jsonl_atomic

    out = check_output(args.out, [args.data], args.overwrite)
    if args.report:
        check_output(args.report, [args.data, args.out], args.overwrite, field="--report")
    options = FilterOptions(
        near=args.near,
        threshold=args.threshold,
        on=args.on,
        min_response_tokens=args.min_response_tokens,
        max_response_tokens=args.max_response_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
    )
    options.check()  # before a tokenizer loads
    tokenizer = None
    if any(v is not None for v in (args.min_response_tokens, args.max_response_tokens, args.max_prompt_tokens)):
        from deltatune.cli.preview import load_tokenizer_from_args

        tokenizer = load_tokenizer_from_args(args)
    records, report = filter_records(args.data, options, column_map=args.column_map, tokenizer=tokenizer)
    if args.report:  # also when nothing is kept: it says why
        write_json_atomic(args.report, report.to_json())
    if not records:  # an empty --out, exit 0, that train then refused ("no records")
        from deltatune.errors import DataError

        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(report.dropped.items()))
        report_note = f"; the report is in {args.report}" if args.report else ""
        raise DataError(f"every record was dropped ({reasons}); --out not written{report_note}", file=str(args.data))
    write_jsonl_atomic(out, records)
    sys.stdout.write(report.format())
    print(f"wrote {out}", file=sys.stderr)
    return 0


def run_mix(args: argparse.Namespace) -> int:
    from deltatune.data.instructions.mix import format_parts, mix, parse_sources
    from deltatune.data.instructions.output import check_output, write_jsonl_atomic

    sources = parse_sources(args.sources)
    out = check_output(args.out, [s.path for s in sources], args.overwrite)
    records, parts = mix(sources, args.n, seed=args.seed)
    write_jsonl_atomic(out, records)
    sys.stdout.write(format_parts(parts))
    print(f"wrote {out}", file=sys.stderr)
    return 0
