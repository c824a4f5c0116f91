"""NF4 weight memory and quantisation error: ours, int4-absmax, and bitsandbytes when importable.

Run: python benchmarks/nf4_quant.py [--real]   (--real also quantises SmolLM2-135M's linears)
Writes benchmarks/results/nf4_quant.json and prints a table. Not a test: numbers, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from deltatune.methods.nf4 import NF4Linear, dequantize_nf4, quantize_nf4

SHAPES = {
    "q/o 576x576": (576, 576),
    "k/v 192x576": (192, 576),
    "gate/up 1536x576": (1536, 576),
    "down 576x1536": (576, 1536),
}


def int4_absmax(w: torch.Tensor, block: int = 64) -> torch.Tensor:
    b = w.reshape(-1, block)
    a = b.abs().amax(1, keepdim=True)
    return (torch.clamp(torch.round(b / a * 7), -8, 7) * a / 7).reshape(w.shape)


def errors(w: torch.Tensor) -> dict[str, float]:
    rel = lambda d: ((d - w).norm() / w.norm()).item()  # noqa: E731
    out = {
        "nf4_mae": (dequantize_nf4(quantize_nf4(w, double_quant=False)) - w).abs().mean().item(),
        "nf4_dq_mae": (dequantize_nf4(quantize_nf4(w)) - w).abs().mean().item(),
        "int4_absmax_mae": (int4_absmax(w) - w).abs().mean().item(),
        "nf4_dq_rel_fro": rel(dequantize_nf4(quantize_nf4(w))),
        "int4_rel_fro": rel(int4_absmax(w)),
    }
    try:
        import bitsandbytes.functional as bf

        q, st = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        out["bnb_nf4_dq_mae"] = (bf.dequantize_4bit(q, st) - w).abs().mean().item()
    except ImportError:
        pass
    return out


def memory(shape: tuple[int, int]) -> dict[str, float]:
    lin = torch.nn.Linear(shape[1], shape[0], bias=False)
    bf16 = lin.weight.numel() * 2
    return {
        "bf16_bytes": bf16,
        "nf4_dq_ratio": NF4Linear.from_linear(lin).weight_nbytes() / bf16,
        "nf4_ratio": NF4Linear.from_linear(lin, double_quant=False).weight_nbytes() / bf16,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", action="store_true", help="also measure SmolLM2-135M-Instruct's weights")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = {}
    for name, shape in SHAPES.items():
        w = torch.randn(shape) * 0.02
        rows[f"gaussian {name}"] = {**memory(shape), **errors(w)}
    if args.real:
        from deltatune.models import load_model

        model, _ = load_model()
        tot = {"nf4": 0, "bf16": 0}
        errs: dict[str, list[float]] = {}
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"):
                tot["nf4"] += NF4Linear.from_linear(m).weight_nbytes()
                tot["bf16"] += m.weight.numel() * 2
                for k, v in errors(m.weight.detach().float()).items():
                    errs.setdefault(k, []).append(v)
        rows["SmolLM2-135M all linears"] = {
            "nf4_dq_ratio": tot["nf4"] / tot["bf16"],
            "bf16_bytes": tot["bf16"],
            **{k: sum(v) / len(v) for k, v in errs.items()},
        }
    keys = sorted({k for r in rows.values() for k in r})
    print(f"{'case':32s} " + " ".join(f"{k:>16s}" for k in keys))
    for name, r in rows.items():
        print(f"{name:32s} " + " ".join(f"{r.get(k, float('nan')):16.6g}" for k in keys))
    out = Path(__file__).parent / "results" / "nf4_quant.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
        json.dump(rows, f, indent=2)
    os.replace(f.name, out)


if __name__ == "__main__":
    main()
