"""`deltatune train [CONFIG.yaml] [--set key=value ...] [flags]`."""

from __future__ import annotations

import argparse

from deltatune.errors import ConfigError

# flag -> config key; each flag's value is parsed by the config's own validation
FLAGS = {
    "--model": "model",
    "--data": "data",
    "--eval-data": "eval_data",
    "--template": "template",
    "--policy": "policy",
    "--method": "method",
    "--targets": "targets",
    "--rank": "rank",
    "--alpha": "alpha",
    "--dropout": "dropout",
    "--lr": "lr",
    "--epochs": "epochs",
    "--steps": "steps",
    "--batch-size": "batch_size",
    "--grad-accum": "grad_accum",
    "--seq-len": "seq_len",
    "--pack-len": "pack_len",
    "--output": "output",
    "--save-every": "save_every",
    "--eval-every": "eval_every",
    "--seed": "seed",
    "--precision": "precision",
    "--format": "data_format",
    "--system-prompt": "system_prompt",
    "--device": "device",
    "--threads": "num_threads",
}
FLAGS["--snapshot-every"] = "snapshot_every"  # keep trainable weights every N steps (never pruned)
# keys whose values are taken verbatim (not parsed as YAML, so "1e-4" stays text where text is meant)
TEXT_KEYS = {"model", "data", "eval_data", "output", "system_prompt", "policy", "targets", "method", "template"}
SWITCHES = {
    "--resume": "resume",
    "--overwrite": "overwrite",
    "--rslora": "rslora",
    "--skip-bad": "skip_bad",
    "--gradient-checkpointing": "gradient_checkpointing",
    "--no-packing": ("packing", False),
    "--trust-remote-code": "trust_remote_code",
    "--fused-update": "fused_update",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="finetune a model (full, LoRA, DoRA, ...) on instruction data",
        description="Finetune a model. Values come from CONFIG, then --set, then flags.",
    )
    p.add_argument("config", nargs="?", help="YAML configuration file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any configuration key (repeatable)",
    )
    for flag, key in FLAGS.items():
        p.add_argument(flag, dest=f"flag_{key}", default=None, metavar=key.upper())
    p.add_argument(
        "--map",
        dest="flag_column_map",
        default=None,
        metavar="A=B,C=D",
        help="rename file columns, e.g. question=instruction,answer=output",
    )
    for flag, key in SWITCHES.items():
        name, value = key if isinstance(key, tuple) else (key, True)
        meaning = "lomo; --set fused_update=fused-adamw for the other" if name == "fused_update" else str(value).lower()
        p.add_argument(
            flag,
            dest=f"switch_{flag.lstrip('-').replace('-', '_')}",
            action="store_true",
            help=f"set {name}: {meaning}",
        )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="data-parallel processes on this machine: re-launches itself under torchrun (see docs/distributed.md)",
    )
    p.set_defaults(func=run)


def collect_overrides(args: argparse.Namespace) -> dict:
    from deltatune.config import parse_overrides

    values = parse_overrides(args.overrides)
    for key in FLAGS.values():
        raw = getattr(args, f"flag_{key}")
        if raw is not None:
            values[key] = raw if key in TEXT_KEYS else parse_overrides([f"{key}={raw}"])[key]
    if args.flag_column_map:
        from deltatune.data.formats import parse_column_map

        values["column_map"] = parse_column_map(args.flag_column_map)
    for flag, key in SWITCHES.items():
        if getattr(args, f"switch_{flag.lstrip('-').replace('-', '_')}"):
            name, value = key if isinstance(key, tuple) else (key, True)
            values[name] = value
    return values


def run(args: argparse.Namespace) -> int:
    if args.nproc is not None:
        import sys

        from deltatune.train.distributed import relaunch_with_torchrun

        return relaunch_with_torchrun(args.nproc, sys.argv[1:])
    import deltatune
    from deltatune.config import load_config
    from deltatune.train.run_folder import check_reads_outside_run_entries

    overrides = collect_overrides(args)
    cfg = load_config(args.config, overrides)
    if not cfg.resume:  # resuming from the config.yaml a run recorded is fine: it is rewritten with the same settings
        check_reads_outside_run_entries(cfg.output, {"configuration file": args.config})
    try:
        deltatune.train(cfg, quiet=args.quiet)  # the public API (docs/api.md)
    except ConfigError as exc:
        raise in_config_file(exc, args.config, set(cfg.model_fields_set) - set(overrides)) from None
    return 0


def in_config_file(exc: ConfigError, config: str | None, file_keys: set[str]) -> ConfigError:
    """A setting training checks (a method name, a policy) named as the config file's key when the file gave it:
    `field '--policy'` blamed a flag the user never passed."""
    if config is None or exc.file is not None or not exc.field:
        return exc
    head, dot, rest = exc.field.partition(".")
    key = FLAGS.get(head) or {"options": "method_options"}.get(head) or head.lstrip("-").replace("-", "_")
    if key not in file_keys:
        return exc
    return ConfigError(exc.message, file=config, field=key + dot + rest)
