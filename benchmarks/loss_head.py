"""The LM head and cross-entropy of a training step against its products at peak: two levers measured.

deltatune's chunked loss (`deltatune/train/loss.py`) computes a chunk's logits in bf16, copies them to float32,
takes the softmax in place, subtracts the one-hot and copies the gradient back to bf16 for the input-gradient
product. Two ways it could be faster:

1. **Smaller chunks** (`loss_chunk`): a chunk of 32-256 rows keeps the logits block (rows x 49,152 floats) nearer
   the caches for the element-wise passes, at the price of thinner products.
2. **One fused pass** for the element-wise chain: the same chain under torch.compile (inductor fuses the cast,
   the row maximum, the exponent sums, the one-hot subtraction and the cast back).

Part 1 times the whole chunked forward (logits, loss, gradient with respect to the hidden states) over `--rows`
loss positions of the default model's shapes at each chunk size, interleaved, and reports it against the two
products alone at the measured bf16 peak. Part 2 times the element-wise chain of one chunk, eager (the loss
module's order of operations) against compiled, and checks they agree.

    python benchmarks/loss_head.py [--rows 512] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command_line, describe, machine_record  # noqa: E402

HERE = Path(__file__).resolve().parent
VOCAB, HIDDEN = 49152, 576  # SmolLM2-135M's tied head
CHUNKS = (1024, 512, 256, 128, 64, 32)


def median_ms(fn, calls: int = 7, warm: int = 2) -> float:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def chunk_sizes(rows: int, repeats: int) -> dict[int, list[float]]:
    from deltatune.train.loss import _ChunkedLinearCrossEntropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, HIDDEN, generator=g).to(torch.bfloat16)
    weight = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.05).to(torch.bfloat16)
    targets = torch.randint(0, VOCAB, (rows,), generator=g)
    token_weights = torch.rand(rows, generator=g)

    def run(chunk: int) -> torch.Tensor:
        return _ChunkedLinearCrossEntropy.apply(
            hidden, weight, None, targets, token_weights, chunk, torch.bfloat16, True, False, 1.0, None
        )

    reference = float(run(CHUNKS[0]))
    times: dict[int, list[float]] = {c: [] for c in CHUNKS}
    for _ in range(repeats):
        for chunk in CHUNKS:
            total = float(run(chunk))
            if abs(total - reference) > 1e-3 * abs(reference):
                raise SystemExit(f"chunk {chunk}: loss {total} differs from {reference}")
            times[chunk].append(median_ms(lambda chunk=chunk: run(chunk)))
    return times


def eager_chain(logits: torch.Tensor, probs: torch.Tensor, t: torch.Tensor, tw: torch.Tensor):
    """The loss module's element-wise work on one chunk, in its order (deltatune/train/loss.py)."""
    rows = torch.arange(t.shape[0])
    probs.copy_(logits)
    target_logit = probs[rows, t]
    row_max = probs.amax(dim=-1)
    torch._softmax(probs, -1, False, out=probs)
    lse = row_max - probs.amax(dim=-1).log()
    total = ((lse - target_logit) * tw).sum()
    probs[rows, t] -= 1.0
    return total, logits.copy_(probs)


def fused_chain(logits: torch.Tensor, t: torch.Tensor, tw: torch.Tensor):
    z = logits.float()
    m = z.amax(-1, keepdim=True)
    e = (z - m).exp()
    s = e.sum(-1, keepdim=True)
    lse = (m + s.log()).squeeze(-1)
    total = ((lse - z.gather(1, t[:, None]).squeeze(1)) * tw).sum()
    onehot = torch.arange(z.shape[1], device=z.device)[None, :] == t[:, None]
    return total, (e / s - onehot.float()).to(logits.dtype)


def chains(rows: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(1)
    source = (torch.randn(rows, VOCAB, generator=g) * 3).to(torch.bfloat16)
    t = torch.randint(0, VOCAB, (rows,), generator=g)
    tw = torch.rand(rows, generator=g)
    probs = torch.empty(rows, VOCAB)
    compiled = torch.compile(fused_chain, dynamic=False)
    eager_total, eager_grad = eager_chain(source.clone(), probs, t, tw)
    fused_total, fused_grad = compiled(source.clone(), t, tw)
    agree = {
        "loss_rel": abs(float(eager_total - fused_total)) / abs(float(eager_total)),
        "grad_max_abs": float((eager_grad.float() - fused_grad.float()).abs().max()),
    }
    buffer = source.clone()
    variants = {
        "copy of the chunk only": lambda: buffer.copy_(source),
        "eager chain": lambda: eager_chain(buffer.copy_(source), probs, t, tw),
        "compiled chain": lambda: compiled(buffer.copy_(source), t, tw),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(median_ms(fn))
    return {"times_ms": times, "agreement": agree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512, help="loss positions (a step of the main benchmark: ~500)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "results" / "loss_head.json"))
    args = parser.parse_args()

    machine = machine_record()
    peak = machine["matmul_peak_gflops"]
    print(f"machine: {describe(machine)}")
    products_ms = 1000 * (2 * 2 * args.rows * VOCAB * HIDDEN / 1e9) / peak  # logits and the input gradient

    sizes = chunk_sizes(args.rows, args.repeats)
    print(f"\n1. the chunked head forward (logits, loss, input gradient) over {args.rows} rows, median of each repeat")
    print(f"   its two products alone at the measured peak: {products_ms:.1f} ms")
    print(f"{'chunk':>7s}{'ms (repeats)':>28s}{'median':>9s}{'products / it':>15s}")
    for chunk, runs in sizes.items():
        med = statistics.median(runs)
        shown = ", ".join(f"{r:.0f}" for r in runs)
        print(f"{chunk:7d}{shown:>28s}{med:9.1f}{100 * products_ms / med:14.0f}%")

    chain = chains(min(args.rows, 1024), args.repeats)
    print(
        f"\n2. the element-wise chain of one chunk of {min(args.rows, 1024)} rows (bf16 logits in, bf16 gradient out)"
    )
    for name, runs in chain["times_ms"].items():
        print(f"   {name:24s}{statistics.median(runs):8.1f} ms  ({', '.join(f'{r:.1f}' for r in runs)})")
    agree = chain["agreement"]
    print(
        f"   compiled against eager: loss {agree['loss_rel']:.1e} relative, gradient {agree['grad_max_abs']:.1e} at most"
    )

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "command": command_line(),
                "machine": machine,
                "rows": args.rows,
                "repeats": args.repeats,
                "products_at_peak_ms": products_ms,
                "chunk_ms": {str(c): runs for c, runs in sizes.items()},
                "chain": chain,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
