"""`deltatune merge --adapter A --out DIR [--model M]`: fold an adapter into its base model.

The base model is the adapter's `base_model_name_or_path` unless --model is given. Merging runs
layer by layer in place (no second copy of the model), in --dtype (fp32 by default, so the sum is
exact before any rounding), and the folder is written atomically in --save-dtype.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge an adapter into its base model and save a transformers folder",
        description="Merge an adapter (PEFT or deltatune format) into its base model.",
    )
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--out", required=True, help="output folder (transformers, safetensors)")
    add_model_options(p, model_help="base model (default: the adapter's base_model_name_or_path)")
    p.set_defaults(func=run)


def add_model_options(p: argparse.ArgumentParser, model_help: str) -> None:
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--dtype", default="fp32", help="dtype to load and merge in (default fp32)")
    p.add_argument("--save-dtype", default=None, help="dtype of the saved weights (default: --dtype)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it exists (never the model, adapter or data being read)",
    )


def merge_and_save(
    model_ref: str | None,
    adapter: str | None,
    out: str,
    *,
    dtype: str,
    save_dtype: str | None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> Path:
    """Load, apply the adapter (if any), merge and write `out`; shared by merge and export.

    `out` is checked before anything loads: never the model or adapter being read (nor a folder
    holding them or inside them), and an existing non-empty path only with `overwrite`."""
    import torch

    from deltatune.fileio import check_output
    from deltatune.methods.apply import export_merged, load_adapter
    from deltatune.models import load_model, local_model_path, parse_dtype, save_model, saved_chat_template

    parse_dtype(dtype)
    if save_dtype:
        parse_dtype(save_dtype, field="save-dtype")
    check_output(out, overwrite=overwrite, reads={"model": local_model_path(model_ref), "adapter": adapter})
    if adapter is not None:  # a broken adapter fails before the model loads
        from deltatune.methods.peft_format import read_adapter

        read_adapter(adapter)
    model, tokenizer = load_model(model_ref, dtype=dtype, trust_remote_code=trust_remote_code)
    if adapter is None:
        if save_dtype:
            model = model.to(parse_dtype(save_dtype))
        return save_model(model, tokenizer, out)
    # the adapter's tensors as saved (fp32 from training), not rounded to a bf16 base's dtype before the merge:
    # the merge computes W + dW in fp32 and rounds once
    adapted = load_adapter(model, adapter, trainable_dtype=torch.float32)
    tokenizer.chat_template = saved_chat_template(adapter) or tokenizer.chat_template  # the merged model's prompts
    return export_merged(adapted, tokenizer, out, dtype=parse_dtype(save_dtype) if save_dtype else None)


def run(args: argparse.Namespace) -> int:
    from deltatune.errors import UserError
    from deltatune.methods.peft_format import adapter_base_model

    recorded = adapter_base_model(args.adapter)
    base = args.model or recorded
    if not base:
        raise UserError(
            f"{args.adapter}: the adapter names no base model (base_model_name_or_path); pass --model", field="model"
        )
    warn_if_other_base(args.model, recorded, args.adapter)
    out = merge_and_save(
        base,
        args.adapter,
        args.out,
        dtype=args.dtype,
        save_dtype=args.save_dtype,
        trust_remote_code=args.trust_remote_code,
        overwrite=args.overwrite,
    )
    print(f"merged {args.adapter} into {base}: wrote {out}")
    return 0


def warn_if_other_base(model: str | None, recorded: str | None, adapter: str) -> None:
    """An adapter merged into another base than it was trained on fits whenever the shapes do, and
    is then silently wrong: say so on stderr, once `model` is known to name a model (a mistyped one is its
    own one-line error, with no warning before it)."""
    import sys

    from deltatune.models import DEFAULT_MODEL_ALIASES, resolve_model, same_model

    if model and recorded and not same_model(model, recorded):
        if str(model).lower() not in DEFAULT_MODEL_ALIASES:  # the default always resolves (and may convert)
            resolve_model(model)
        print(
            f"warning: {adapter} was trained on {recorded}, not {model}; the merge fits whenever the shapes "
            f"do, but the result is only meaningful on the base it was trained on",
            file=sys.stderr,
        )
