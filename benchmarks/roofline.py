"""The attainable limit of one LoRA training step: only its matrix products, at the step's exact shapes.

A square-matmul peak is not a fair limit at hidden size 576: the step's products are thin (k=8 LoRA
factors, 192-wide grouped k/v projections, per-example attention blocks), and oneDNN runs those far
below the peak. This script rebuilds the benchmark's own steps (SmolLM2-135M, GSM8K train first 512
examples, chat template, response-only loss, rows of 256 tokens, 4 rows a step laid end to end,
LoRA r=8 on all linear layers; the same data path as `train_speed.py`'s deltatune contender) and times
in the training precision (bf16 where the CPU has it), on this machine, every matmul one step needs:

- base forward x W^T of the seven projections per layer, and their input gradients dY W (the frozen
  base gets no weight gradient);
- LoRA's four products per projection forward and backward (x A^T, (xA^T) B^T, the two weight
  gradients, the two input gradients);
- attention per example: QK^T and PV forward, and backward's dP, dV, dQ, dK, with QK^T recomputed for the
  spans whose probabilities are not kept (longer than KEEP_PROBABILITIES); a span longer than packed
  attention's WHOLE_SPAN by blocks of query rows, each against the keys it sees, as the kernel runs it;
- the LM head on loss-bearing positions only (forward and the hidden-state gradient; the tied head is
  frozen under LoRA).

The sum over the timed steps is the roofline: a step cannot be faster than its matmuls run alone.
With `--measure` the deltatune contender of train_speed.py runs on the same steps (its own process)
and the step time is reported as a fraction of the roofline.

With `--method full` the same for full finetuning (every weight gradient, no LoRA factors; deltatune's
full-finetuning contender measured; written to roofline_full.json). With `--compiled` the contender with
compiled decoder layers (`deltatune-compiled`, `deltatune-compiled-full`: what `compile_layers: auto` gives a run
of 500k tokens or more; the compilation falls in the untimed warm-up steps) runs as well, interleaved.

    python benchmarks/roofline.py [--steps 12] [--warmup 2] [--rank 8] [--method lora|full] [--measure] [--repeats 3]
                                   [--compiled] [--cold]

With `--cold` a second roofline times each product with its operands out of the core's cache (a pool of distinct
operands used in turn): inside a step every weight and activation is used once and then not again until the
next pass, so the warm roofline (the same operands every time) is the most favourable bound and the cold one
what a product inside a step can expect. On the AMX Xeon the step's shapes ran 1.14-1.40x slower cold.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command_line, describe, machine_record, native_precision, run_child  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "roofline.json"
MAX_LEN, BATCH = 256, 4


def benchmark_batches(tokenizer, steps: int) -> list[tuple[list, dict]]:
    """(packed rows, flat batch) of each step the deltatune contender trains on (same examples, packing, seed)."""
    from train_speed import benchmark_data

    from deltatune.config import TrainConfig
    from deltatune.data.masking import parse_policy
    from deltatune.data.packing import collate
    from deltatune.data.pipeline import prepare_records
    from deltatune.train.checkpoint import Position
    from deltatune.train.loop import MicroBatches

    cfg = TrainConfig(template="chatml", policy="response", seq_len=MAX_LEN, batch_size=BATCH, eval_fraction=0.0)
    records, _, _ = benchmark_data(tokenizer, steps * BATCH)  # the examples train_speed.py trains on
    examples = list(prepare_records(records, tokenizer, template="chatml", max_len=MAX_LEN).examples)
    data, pos, policy = MicroBatches(examples, cfg), Position(), parse_policy("response")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for _ in range(steps):
        rows = data.take(pos, 1)[0]
        batch = collate(rows, policy, seq_len=MAX_LEN, pad_id=pad, packed=True, flat=True, template_name="chatml")
        out.append((rows, batch))
    return out


def benchmark_steps(steps: int, warmup: int) -> tuple[list[dict], object]:
    """The shapes of the timed steps (those after `warmup`) of `benchmark_batches`, and the model's config."""
    from transformers import AutoConfig

    from deltatune.models import default_model_dir, load_tokenizer

    model_dir = default_model_dir()
    out = []
    for rows, batch in benchmark_batches(load_tokenizer(model_dir), warmup + steps)[warmup:]:
        n_loss = int((batch["loss_weights"][:, 1:] > 0).sum())
        out.append(
            {
                "T": batch["input_ids"].shape[1],
                "spans": [len(ex) for row in rows for ex in row],
                "n_loss": -(-n_loss // 32) * 32,
                "real_tokens": batch["n_real_tokens"],
            }
        )
    return out, AutoConfig.from_pretrained(model_dir)


def step_products(step: dict, c, rank: int, full: bool = False) -> Counter:
    """(kind, m, k, n, batch) -> count: one product of `batch` (m x k) and (k x n) matrices, per step.

    `full`: full finetuning instead of LoRA: no LoRA factors, but every projection's weight gradient
    (dY^T X), and the tied LM head's weight gradient from the loss positions (the embedding's own gradient
    is a scatter-add, no product)."""
    h, heads, kv_heads = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    d_head = h // heads
    projections = [
        (h, h),
        (h, kv_heads * d_head),
        (h, kv_heads * d_head),
        (h, h),
        (h, c.intermediate_size),
        (h, c.intermediate_size),
        (c.intermediate_size, h),
    ]  # (in, out)
    T, L = step["T"], c.num_hidden_layers
    products: Counter = Counter()
    for d_in, d_out in projections:
        products[("base fwd", T, d_in, d_out, 1)] += L
        products[("base dX", T, d_out, d_in, 1)] += L
        if full:
            products[("base dW", d_out, T, d_in, 1)] += L
        elif rank:
            products[("lora fwd A", T, d_in, rank, 1)] += L
            products[("lora fwd B", T, rank, d_out, 1)] += L
            products[("lora dB", d_out, T, rank, 1)] += L
            products[("lora d(xA)", T, d_out, rank, 1)] += L
            products[("lora dA", rank, T, d_in, 1)] += L
            products[("lora dX", T, rank, d_in, 1)] += L
    for n in step["spans"]:  # batched products over the heads, per block of query rows as SpanAttention runs them
        for first, end in _query_blocks(n):
            rows, keys = min(end, n) - first, min(end, n)  # the block's real query rows, and the keys they see
            for kind, (m, k, nn) in {
                "attn QK fwd": (rows, d_head, keys),
                "attn PV fwd": (rows, keys, d_head),
                "attn QK recompute": (rows, d_head, keys),
                "attn dP": (rows, d_head, keys),
                "attn dV": (keys, rows, d_head),
                "attn dQ": (rows, keys, d_head),
                "attn dK": (keys, rows, d_head),
            }.items():
                if kind == "attn QK recompute" and _keeps_probabilities(n):
                    continue  # the span's probabilities are kept from forward: no product in backward
                products[(kind, m, k, nn, heads)] += L
    products[("head fwd", step["n_loss"], h, c.vocab_size, 1)] += 1
    products[("head dH", step["n_loss"], c.vocab_size, h, 1)] += 1
    if full:
        products[("head dW", c.vocab_size, step["n_loss"], h, 1)] += 1
    return products


def _query_blocks(n: int) -> list[tuple[int, int]]:
    """SpanAttention's blocks of query rows for a span of n tokens (whole up to WHOLE_SPAN), on real rows."""
    from deltatune.train import packed_attention

    return packed_attention._query_blocks(-(-n // packed_attention.TILE) * packed_attention.TILE)


def _keeps_probabilities(n: int) -> bool:
    """Whether SpanAttention keeps a span of n tokens' probabilities for backward instead of recomputing them."""
    from deltatune.train import packed_attention

    return -(-n // packed_attention.TILE) * packed_attention.TILE <= min(
        packed_attention.KEEP_PROBABILITIES, packed_attention.WHOLE_SPAN
    )


COLD_BYTES = 64 << 20  # operands cycled through with --cold: well above the L2 caches, as a step's 30 layers are


def time_product(m: int, k: int, n: int, batch: int, reps: int, dtype: torch.dtype, cold: bool = False) -> float:
    """Seconds per (batch x m x k) @ (batch x k x n) with contiguous operands (median of `reps` timings).

    Warm (the default): the same operands every time, so they stay in the core's cache, the most favourable
    case. `cold`: a pool of distinct operands (COLD_BYTES in all) used in turn, as the step uses each layer's
    weights and activations once before moving on: each product reads its operands from the shared cache or
    memory, which is what a product inside a training step does."""
    size = dtype.itemsize * batch * (m * k + k * n + m * n)  # bytes
    pool = max(2, min(64, COLD_BYTES // max(size, 1))) if cold else 1
    operands = [
        (
            torch.randn(batch, m, k, dtype=dtype),
            torch.randn(batch, k, n, dtype=dtype),
            torch.empty(batch, m, n, dtype=dtype),
        )
        for _ in range(pool)
    ]
    if batch == 1:
        products = [lambda a=a, b=b, out=out: torch.mm(a[0], b[0], out=out[0]) for a, b, out in operands]
    else:
        products = [lambda a=a, b=b, out=out: torch.bmm(a, b, out=out) for a, b, out in operands]
    inner = max(1, int(2e8 // max(2 * m * k * n * batch, 1)))  # ~0.2 GFLOP per timing, at least one product
    inner = -(-inner // pool) * pool  # whole rounds of the pool
    for product in products * 2:
        product()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for i in range(inner):
            products[i % pool]()
        times.append((time.perf_counter() - t) / inner)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--method", default="lora", choices=["lora", "full"], help="full: full finetuning's products")
    parser.add_argument("--reps", type=int, default=5, help="timings per shape (median)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="auto = what training picks here: bf16 where the CPU has AVX-512 bf16 or AMX",
    )
    parser.add_argument("--measure", action="store_true", help="also run the deltatune contender on the same steps")
    parser.add_argument("--repeats", type=int, default=3, help="with --measure: roofline and run, interleaved")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="also the roofline with each product's operands out of the core's cache, as inside a step",
    )
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="with --measure: also the contender with compiled decoder layers (what runs of 500k+ tokens get)",
    )
    parser.add_argument("--out", type=Path, help="results file (default: results/roofline.json, roofline_full.json)")
    args = parser.parse_args()

    machine = machine_record(measure_peak=False)
    if args.dtype == "auto":
        args.dtype = native_precision(machine)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    print(f"machine: {describe(machine)}; products in {args.dtype}")
    steps, c = benchmark_steps(args.steps, args.warmup)
    total: Counter = Counter()
    for step in steps:
        total.update(step_products(step, c, args.rank, full=args.method == "full"))
    tokens = sum(s["real_tokens"] for s in steps)

    def roofline_once(cold: bool) -> tuple[float, dict]:
        seconds, by_kind = 0.0, Counter()
        for (kind, m, k, n, batch), count in total.items():
            t = time_product(m, k, n, batch, args.reps, dtype, cold=cold) * count
            seconds += t
            by_kind[kind.split(" ")[0]] += t
        return seconds, dict(by_kind)

    caches = ["warm", "cold"] if args.cold else ["warm"]
    contenders = ["deltatune-full" if args.method == "full" else "deltatune"]
    if args.compiled:
        contenders.append(contenders[0].replace("deltatune", "deltatune-compiled"))
    rooflines = {cache: [] for cache in caches}
    by_part = {}
    measured = {name: [] for name in contenders}
    for i in range(args.repeats if args.measure else 1):
        for cache in caches:
            seconds, by_part[cache] = roofline_once(cache == "cold")
            rooflines[cache].append(seconds)
        if args.measure:
            from deltatune.models import default_model_dir

            ctx = {
                "model": str(default_model_dir()),
                "precision": args.dtype,
                "steps": args.steps,
                "warmup": args.warmup,
                "examples": (args.steps + args.warmup) * BATCH,
            }
            for name in contenders:
                run = run_child(str(REPO / "benchmarks" / "train_speed.py"), name, ctx)
                measured[name].append(tokens / run["seconds"])
    flops = sum(2 * m * k * n * batch * count for (_, m, k, n, batch), count in total.items())
    print(f"\n{len(steps)} steps, {tokens} real tokens; {flops / 1e12:.2f} TFLOP of matmuls")
    result = {
        "command": command_line(),
        "machine": machine,
        "dtype": args.dtype,
        "steps": args.steps,
        "warmup": args.warmup,
        "method": args.method,
        "rank": args.rank if args.method == "lora" else None,
        "compiled_layers": args.compiled,
        "tokens": tokens,
        "matmul_tflop": flops / 1e12,
    }
    for cache in caches:
        runs = rooflines[cache]
        roof_s = statistics.median(runs)
        roof_tps = tokens / roof_s
        prefix = "" if cache == "warm" else "cold_"
        print(f"\n{cache} operands ({'the same every time' if cache == 'warm' else 'out of the core cache'})")
        print(f"{'part':10s}{'seconds':>10s}{'share':>8s}")
        for kind, t in sorted(by_part[cache].items(), key=lambda kv: -kv[1]):
            print(f"{kind:10s}{t:10.2f}{100 * t / sum(by_part[cache].values()):7.1f}%")
        print(
            f"roofline: {roof_s:.2f} s = {roof_tps:.0f} tokens/s ({flops / roof_s / 1e9:.0f} GFLOP/s on the step's "
            f"shapes; spread {min(runs):.2f}-{max(runs):.2f} s)"
        )
        result.update(
            {
                f"{prefix}roofline_s": runs,
                f"{prefix}roofline_tokens_per_s": roof_tps,
                f"{prefix}by_part_s": by_part[cache],
            }
        )
        if args.measure:
            result[f"{prefix}fraction_of_roofline"] = {}
            for name, tps in measured.items():
                med = statistics.median(tps)
                result[f"{prefix}fraction_of_roofline"][name] = med / roof_tps
                print(
                    f"{name}: {med:.0f} tokens/s (runs {', '.join(f'{x:.0f}' for x in tps)}) = "
                    f"{100 * med / roof_tps:.0f}% of the {cache} roofline"
                )
    if args.measure:
        result["measured_tokens_per_s"] = measured
    out = args.out or (RESULTS if args.method == "lora" else RESULTS.with_name("roofline_full.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
