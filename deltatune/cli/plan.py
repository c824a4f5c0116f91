"""`deltatune plan --model M --method lora --rank 8 [--gpu-memory 24GiB]`: will this finetune fit?

Builds the model from its config alone on the meta device (no weights, no download for the
built-in sizes such as llama-7b and llama-70b) and prints parameters and memory.
"""

from __future__ import annotations

import argparse


def _train_default(key: str):
    """`deltatune train`'s default for `key`, so that a plan describes the run train would start."""
    from deltatune.config import TrainConfig

    return TrainConfig.model_fields[key].default


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="estimate parameters and memory of a finetune from the config alone",
        description="Estimate trainable parameters and training memory without loading weights. "
        "MODEL is a folder, a built-in size (llama-7b, llama-70b, ...), the default "
        "model, or a hub id where a network exists.",
    )
    p.add_argument("--model", default=None, help="model folder, built-in name, or hub id (default: the default model)")
    p.add_argument(
        "--method", default="lora", help="method, or several joined by '+' as in training (e.g. lora+bitfit)"
    )
    p.add_argument("--rank", type=int, default=_train_default("rank"), help="default: %(default)s, as train")
    p.add_argument("--alpha", type=float, default=None, help="default: training's default (16)")
    p.add_argument("--targets", default="all-linear", help="all-linear, suffixes like q_proj,v_proj, or a regex")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--rslora", action="store_true")
    p.add_argument(
        "--dtype",
        default="bf16",
        help="frozen weights' and compute dtype: bf16, fp16, fp32 (trainable weights are counted in fp32, and "
        "full finetuning's whole model, as deltatune train keeps them)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=_train_default("batch_size"),
        help="rows a step; default: %(default)s, as train",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=_train_default("seq_len"),
        help="tokens a row (train's seq_len, or pack_len where it sets one); default: %(default)s, as train",
    )
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--attention-matrix",
        action="store_true",
        help="count the batch x heads x seq x seq attention probabilities (eager attention)",
    )
    p.add_argument("--gpu-memory", default=None, help="say whether it fits, e.g. 24GiB or 80GB")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deltatune.analysis.memory import parse_bytes, report_json
    from deltatune.methods.specs import specs_from_config

    gpu = parse_bytes(args.gpu_memory) if args.gpu_memory else None
    specs = specs_from_config(
        {
            "method": args.method,
            "targets": args.targets,
            "rank": args.rank,
            "alpha": args.alpha,
            "dropout": args.dropout,
            "rslora": args.rslora,
        }
    )
    report = _plan(args, specs, gradient_checkpointing=args.gradient_checkpointing)
    print(report_json(report) if args.json else report.table(gpu))
    if gpu is not None and not args.json and not report.fits(gpu):
        for line in _what_would_fit(report, gpu, args, specs):
            print(line)
    return 0


def _plan(args: argparse.Namespace, specs, *, gradient_checkpointing: bool):
    from deltatune.analysis.memory import plan_finetune

    return plan_finetune(
        args.model,
        specs,
        dtype=args.dtype,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        gradient_checkpointing=gradient_checkpointing,
        materialised_attention=args.attention_matrix,
    )


def _what_would_fit(report, gpu: int, args: argparse.Namespace, specs) -> list[str]:
    """Settings that would fit: fewer rows a step (activations grow with them; grad_accum keeps the batch), and
    gradient checkpointing."""
    from deltatune.analysis.memory import CUDA_OVERHEAD, format_bytes

    advice = []
    per_row = report.activation_bytes / report.batch_size
    spare = gpu - CUDA_OVERHEAD - (report.total_bytes - report.activation_bytes)
    rows = int(spare // per_row) if per_row > 0 else 0
    if 1 <= rows < report.batch_size:
        smaller = max(d for d in range(1, rows + 1) if report.batch_size % d == 0)
        accum = report.batch_size // smaller
        advice.append(
            f"  --batch-size {smaller} with --set grad_accum={accum} fits: the same {report.batch_size} rows a step"
        )
    if not args.gradient_checkpointing:
        checkpointed = _plan(args, specs, gradient_checkpointing=True)
        need = format_bytes(checkpointed.total_bytes + CUDA_OVERHEAD)
        verdict = "fits" if checkpointed.fits(gpu) else "does not fit either"
        advice.append(
            f"  --gradient-checkpointing {verdict} (needs about {need}; backward recomputes each layer's forward)"
        )
    if rows < 1 and all("does not fit" in a for a in advice):
        four_bit = "" if "qlora" in args.method else "a 4-bit base (--method qlora) or "
        advice.append(f"  the weights alone leave too little room: {four_bit}a larger GPU")
    return ["what would fit:", *advice] if advice else []
