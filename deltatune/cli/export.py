"""`deltatune export --model M [--adapter A] --out DIR`: a model (plus an optional adapter, merged)
to a plain transformers safetensors folder, e.g. the default GGUF model or a trained run."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from deltatune.cli.merge import add_model_options

    p = sub.add_parser(
        "export",
        help="write a model (and optional adapter, merged) as a transformers folder",
        description="Export a model, merged with an adapter if given, as transformers safetensors.",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--adapter", default=None, help="adapter folder to merge in")
    add_model_options(
        p,
        model_help="model folder, GGUF file, hub id, or 'default' (default: the adapter's base; without an "
        "adapter, the default model)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deltatune.cli.merge import merge_and_save, warn_if_other_base
    from deltatune.errors import UserError
    from deltatune.methods.peft_format import adapter_base_model

    model = args.model
    if args.adapter is not None:
        recorded = adapter_base_model(args.adapter)
        warn_if_other_base(model, recorded, args.adapter)
        model = model or recorded
        if not model:  # as merge: merging into the default model unasked gave another model or a tensor count error
            raise UserError(
                f"{args.adapter}: the adapter names no base model (base_model_name_or_path); pass --model "
                "(--model default for SmolLM2-135M-Instruct)",
                field="model",
            )
    out = merge_and_save(
        model,
        args.adapter,
        args.out,
        dtype=args.dtype,
        save_dtype=args.save_dtype,
        trust_remote_code=args.trust_remote_code,
        overwrite=args.overwrite,
    )
    print(f"exported {model or 'the default model'}{' + ' + args.adapter if args.adapter else ''}: wrote {out}")
    return 0
