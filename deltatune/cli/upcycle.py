"""`deltatune upcycle --model M --experts E --layers every-other --router topk --k 2 --out DIR`.

Sparse upcycling (arXiv 2212.05055): the chosen layers' MLPs become E copies plus a router.
Defaults follow the paper's released decoder configs: every other layer, top-2 routing with the
raw softmax probabilities as combine weights. See docs/upcycling.md.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deltatune.upcycle.convert import UpcycleSpec


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "upcycle",
        help="turn a dense model's MLPs into a mixture of experts (sparse upcycling)",
        description="Replace the MLP of chosen decoder layers by E copies and a router (normal "
        "init, std 0.02, no bias). Top-k models of Llama sources are written as "
        "Mixtral or Qwen2-MoE folders; others in deltatune's format.",
    )
    p.add_argument("--model", default=None, help="dense model folder, .gguf, or the default model")
    p.add_argument("--experts", type=int, default=8, help="experts per MoE layer (default 8)")
    p.add_argument(
        "--layers",
        default="every-other",
        help="every-other (0-based odd layers) | all | last:N | i,j,k (0-based); default every-other",
    )
    p.add_argument("--router", default="topk", choices=["topk", "expert-choice"])
    p.add_argument("--k", type=int, default=None, help="experts per token for top-k (default 2)")
    p.add_argument(
        "--capacity",
        type=float,
        default=None,
        help="capacity factor C: top-k drops assignments beyond ceil(C*k*n/E) per expert while "
        "training (default: no limit); expert choice takes C*n/E tokens per expert (default 2)",
    )
    p.add_argument(
        "--normalize",
        action="store_true",
        help="renormalise each token's top-k weights to sum to 1 (default: raw softmax weights)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the router initialisation")
    p.add_argument("--dtype", default="fp32", help="dtype of the saved weights (default fp32)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (never the model being read)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deltatune.errors import UserError
    from deltatune.fileio import check_output
    from deltatune.models import load_model, local_model_path, save_model
    from deltatune.upcycle.convert import UpcycleSpec, count_parameters, decoder_layers, parse_layers, upcycle
    from deltatune.upcycle.io import export_format, is_upcycled_dir

    # as merge and export check theirs: never the model read (or inside it), never the current folder, a parent
    # that is a file or not writable refused now, not after the upcycling (a traceback)
    out = check_output(args.out, overwrite=args.overwrite, reads={"model": local_model_path(args.model)})
    if args.model and is_upcycled_dir(args.model):
        raise UserError(f"{args.model} is already upcycled", field="model")
    from transformers import AutoConfig

    from deltatune.models import resolve_model
    from deltatune.upcycle.convert import refuse_moe_source, validate

    ref, extra = resolve_model(args.model)
    config = AutoConfig.from_pretrained(ref, **extra)
    # before loading: a Mixtral / Qwen2-MoE source's MLPs are mixtures of experts already
    refuse_moe_source(config, str(args.model or "the default model"))
    n_layers = config.num_hidden_layers  # check the choice before loading
    if args.k is not None and args.router == "expert-choice":  # it was ignored, and recorded in upcycle.json
        raise UserError(
            "--k is the top-k router's option: with expert choice each expert picks its tokens (--capacity sets how "
            "many)",
            field="k",
        )
    spec = UpcycleSpec(
        experts=args.experts,
        router=args.router,
        k=2 if args.k is None else args.k,
        capacity=args.capacity,
        normalize=args.normalize,
        layers=parse_layers(args.layers, n_layers),
    )
    validate(spec)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    if len(decoder_layers(model)) != n_layers:
        raise UserError(f"the model has {len(decoder_layers(model))} decoder layers, its config says {n_layers}")
    dense_total = sum(p.numel() for p in model.parameters())
    upcycle(model, spec, seed=args.seed)
    counts = count_parameters(model)
    fmt, why = export_format(model, spec)
    save_model(model, tokenizer, out)
    print(f"upcycled {len(spec.layers)} layer(s) {spec.layers} to {spec.experts} experts ({routing_summary(spec)})")
    print(
        f"parameters: {dense_total / 1e6:.1f}M dense -> {counts['total'] / 1e6:.1f}M total, "
        f"{counts['active_per_token'] / 1e6:.1f}M active per token"
    )
    print(f"wrote {out} ({fmt} format: {why})")
    return 0


def routing_summary(spec: UpcycleSpec) -> str:
    """How the blocks route, in the words of the router chosen: raw or renormalised combine weights are a
    top-k notion (expert choice weights each chosen token by its probability for the expert)."""
    if spec.router == "topk":
        weights = "renormalised" if spec.normalize else "raw softmax"
        return f"topk, k={spec.k}, capacity {spec.capacity}, {weights} weights"
    return f"{spec.router}, capacity {spec.capacity}"
