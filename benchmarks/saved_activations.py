"""Activation memory that autograd keeps for backward, per method, on the default model.

Counts the bytes of every tensor saved for backward whose leading dimensions are a multiple of the tokens
(activations, not weights), once per storage, over one forward and backward of the decoder on 1 x T random
tokens, and scales them to a batch (default the learn-forget experiment's 8 x 512 rows). This is the part
of a training step's peak that grows with the batch; it is exact for the step's saved tensors, and it does
not depend on the CPU's speed, so bf16 can be measured at a small T even where bf16 matmuls are emulated.

    python benchmarks/saved_activations.py --methods lora,dora --tokens 128 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command_line, describe, machine_record  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "saved_activations.json"


def saved_bytes(method: str, tokens: int, precision: str, rank: int, dropout: float) -> int:
    """Bytes saved for backward in one decoder forward/backward, as deltatune trains (fp32 trainables,
    the frozen base in bf16 under bf16 autocast, or all fp32)."""
    from deltatune.methods.apply import apply_methods
    from deltatune.methods.base import MethodSpec
    from deltatune.models import load_model

    torch.manual_seed(0)
    full = method == "full"
    model, _ = load_model(None, dtype=torch.bfloat16 if precision == "bf16" and not full else torch.float32)
    spec = MethodSpec(method) if full else MethodSpec(method, rank=rank, alpha=2 * rank, dropout=dropout)
    adapted = apply_methods(model, spec)
    for _, p in adapted.trainable_parameters():
        p.data = p.data.float()
    model = adapted.model.train()
    ids = torch.randint(100, model.config.vocab_size - 100, (1, tokens))
    seen: set = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        rows = t.shape[:-1].numel() if t.dim() >= 2 else 0
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
        if rows and rows % tokens == 0 and key not in seen:  # [T, d], [1, T, d], [1, heads, T, d], ...
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        hidden.float().square().mean().backward()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="lora,dora", help="comma-separated (first is the reference)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens measured (one row)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--batch", default="8x512", help="rows x tokens to scale to")
    args = parser.parse_args()
    rows, length = (int(v) for v in args.batch.split("x"))
    machine = machine_record(measure_peak=False)
    print(describe(machine))
    results = []
    for method in args.methods.split(","):
        t = time.perf_counter()
        total = saved_bytes(method, args.tokens, args.precision, args.rank, args.dropout)
        per_token = total / args.tokens
        results.append(
            {
                "method": method,
                "bytes_per_token": per_token,
                "gb_at_batch": per_token * rows * length / 1e9,
                "seconds": round(time.perf_counter() - t, 1),
            }
        )
    ref = results[0]["bytes_per_token"]
    print(f"{args.precision}, rank {args.rank}, dropout {args.dropout}, measured on {args.tokens} tokens")
    print(f"{'method':10} {'KB/token':>10} {'GB at ' + args.batch:>14} {'x ' + results[0]['method']:>8}")
    for r in results:
        r["x_reference"] = r["bytes_per_token"] / ref
        print(f"{r['method']:10} {r['bytes_per_token'] / 1e3:10.1f} {r['gb_at_batch']:14.2f} {r['x_reference']:8.2f}")
    RESULTS.write_text(
        json.dumps({"command": command_line(), "machine": machine, **vars(args), "results": results}, indent=1)
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
