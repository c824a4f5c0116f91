"""Span attention by query blocks: does skipping the scores above the causal diagonal pay?

`SpanAttention` (deltatune/train/packed_attention.py) computes each example's causal attention from a few
batched matmuls. Whole, a span of n tokens scores all n x n (query, key) pairs and masks the upper half
away. By query blocks, a span longer than `WHOLE_SPAN` takes `QUERY_BLOCK` query rows at a time against
only the keys up to each block's last row: fewer flops in every product, the softmax and the mask, for
more, thinner products. Two measurements, each whole against blocks, interleaved, medians:

- kernel: forward and backward of one packed row (SmolLM2-135M's attention shapes: 9 query heads, 3
  key/value heads, head size 64; the training precision of this machine) at span lengths 256 to 4,096;
- training: LoRA r=8 steps of the default model on long examples (GSM8K questions with `--shots` solved
  examples before them, the chat template, response-only loss, one example a row of `--seq-len` tokens),
  each variant in its own process, with the step losses compared.

    python benchmarks/span_attention_blocks.py [--repeats 5] [--train-repeats 3] [--steps 6] [--warmup 2]
                                               [--seq-len 2048] [--shots 8] [--no-kernel] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command_line, describe, machine_record, native_precision, run_child  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "span_attention_blocks.json"
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
ROWS = {256: [256] * 4, 384: [384] * 3, 512: [512] * 2, 1024: [1024], 2048: [2048], 4096: [4096]}
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
WHOLE = 10**9  # WHOLE_SPAN for the "whole" variant: no span is split


def set_variant(variant: str) -> None:
    from deltatune.train import packed_attention

    if variant == "whole":
        packed_attention.WHOLE_SPAN = WHOLE


def kernel(repeats: int, dtype_name: str) -> list[dict]:
    """Forward + backward ms of one packed row per span length, whole against blocks."""
    import torch

    from deltatune.train import packed_attention

    blocks_whole_span = packed_attention.WHOLE_SPAN
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    rows = []
    for length, spans_lengths in ROWS.items():
        total = sum(spans_lengths)
        gen = torch.Generator().manual_seed(length)
        q, k, v = (torch.randn(1, h, total, HEAD_DIM, generator=gen).to(dtype) for h in (HEADS, KV_HEADS, KV_HEADS))
        grad = torch.randn(1, total, HEADS, HEAD_DIM, generator=gen).to(dtype)
        starts = [sum(spans_lengths[:i]) for i in range(len(spans_lengths))]
        spans = [[(s, s + n) for s, n in zip(starts, spans_lengths)]]
        inner = max(1, 4096 // length)

        def run() -> None:
            q_, k_, v_ = (x.detach().requires_grad_() for x in (q, k, v))
            packed_attention.span_attention(q_, k_, v_, spans, HEAD_DIM**-0.5).backward(grad)

        times: dict[str, list[float]] = {"whole": [], "blocks": []}
        for i in range(repeats + 1):  # the first round warms both up and is not kept
            for variant in times:
                packed_attention.WHOLE_SPAN = WHOLE if variant == "whole" else blocks_whole_span
                t = time.perf_counter()
                for _ in range(inner):
                    run()
                if i:
                    times[variant].append((time.perf_counter() - t) / inner * 1e3)
        packed_attention.WHOLE_SPAN = blocks_whole_span
        whole, blocks = statistics.median(times["whole"]), statistics.median(times["blocks"])
        pairs = [w / b for w, b in zip(times["whole"], times["blocks"])]
        rows.append(
            {
                "span": length,
                "spans_in_row": len(spans_lengths),
                "whole_ms": whole,
                "blocks_ms": blocks,
                "speedup": whole / blocks,
                "pairs": [min(pairs), max(pairs)],
            }
        )
        print(
            f"  span {length:5d} x{len(spans_lengths)}: whole {whole:8.2f} ms, blocks {blocks:8.2f} ms, {whole / blocks:.2f}x"
        )
    return rows


def long_records(shots: int, n: int) -> list[dict]:
    """GSM8K questions, each after `shots` solved examples (the next lines of the file)."""
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[: n * (shots + 1)]]
    records = []
    for i in range(n):
        group = rows[i * (shots + 1) : (i + 1) * (shots + 1)]
        solved = "\n\n".join(f"Question: {r['question']}\nAnswer: {r['answer']}" for r in group[:-1])
        records.append({"instruction": f"{solved}\n\nQuestion: {group[-1]['question']}", "output": group[-1]["answer"]})
    return records


def child(variant: str, ctx: dict) -> None:
    """Train ctx's steps with one variant; prints RESULT {json}."""
    import resource
    import tempfile

    from deltatune.config import TrainConfig
    from deltatune.train.loop import train

    set_variant(variant)
    steps = ctx["steps"] + ctx["warmup"]
    cfg = TrainConfig(
        template="chatml",
        policy="response",
        method="lora",
        rank=8,
        alpha=16,
        dropout=0.0,
        lr=2e-4,
        schedule="constant",
        steps=steps,
        batch_size=1,
        seq_len=ctx["seq_len"],
        precision=ctx["precision"],
        output=tempfile.mkdtemp(prefix="span-blocks-"),
        eval_fraction=0.0,
        warmup_steps=0,
        log_every=1,
    )
    marks = [time.perf_counter()]
    result = train(
        cfg,
        quiet=True,
        records=long_records(ctx["shots"], steps),
        on_step=lambda step, total, model: marks.append(time.perf_counter()),
    )
    step_s = [b - a for a, b in zip(marks, marks[1:])][ctx["warmup"] :]
    losses = [h["loss"] for h in result.history if "loss" in h]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record = {
        "step_s": step_s,
        "losses": losses,
        "tokens": result.real_tokens,
        "steps": steps,
        "peak_rss_mib": peak_mib,
    }
    print("RESULT " + json.dumps(record))


def training(repeats: int, ctx: dict) -> dict:
    runs: dict[str, list[dict]] = {"whole": [], "blocks": []}
    for _ in range(repeats):
        for variant in runs:
            runs[variant].append(run_child(__file__, variant, ctx))
    median = {v: statistics.median(statistics.median(r["step_s"]) for r in rs) for v, rs in runs.items()}
    rss = {v: statistics.median(r["peak_rss_mib"] for r in rs) for v, rs in runs.items()}
    tokens_per_step = runs["whole"][0]["tokens"] / runs["whole"][0]["steps"]
    loss_gap = max(
        abs(a - b) / abs(b) for w, bl in zip(runs["whole"], runs["blocks"]) for a, b in zip(bl["losses"], w["losses"])
    )
    out = {
        "tokens_per_step": tokens_per_step,
        "whole_step_s": median["whole"],
        "blocks_step_s": median["blocks"],
        "speedup": median["whole"] / median["blocks"],
        "max_relative_loss_difference": loss_gap,
        "whole_peak_rss_mib": rss["whole"],
        "blocks_peak_rss_mib": rss["blocks"],
        "runs": runs,
    }
    print(
        f"  {tokens_per_step:.0f} tokens a step: whole {median['whole']:.2f} s, blocks {median['blocks']:.2f} s a step, "
        f"{out['speedup']:.3f}x; losses within {100 * loss_gap:.2f}%; peak RSS {rss['whole']:,.0f} against "
        f"{rss['blocks']:,.0f} MiB"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="kernel timings per variant (interleaved)")
    parser.add_argument("--train-repeats", type=int, default=3, help="training runs per variant (interleaved)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--shots", type=int, default=8, help="solved GSM8K examples before each question")
    parser.add_argument("--no-kernel", action="store_true", help="only the training comparison")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--ctx", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, json.loads(args.ctx))

    machine = machine_record()
    precision = native_precision(machine)
    print(f"machine: {describe(machine)}; attention in {precision}")
    kernel_rows = []
    if not args.no_kernel:
        print("kernel (forward + backward of one packed row):")
        kernel_rows = kernel(args.repeats, precision)
    ctx = {
        "steps": args.steps,
        "warmup": args.warmup,
        "seq_len": args.seq_len,
        "shots": args.shots,
        "precision": precision,
    }
    print(f"training (LoRA r=8, {args.shots}-shot GSM8K examples, one a row of {args.seq_len}):")
    train_result = training(args.train_repeats, ctx) if args.train_repeats else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": command_line(),
                "machine": machine,
                "precision": precision,
                "kernel": kernel_rows,
                "training": {"config": ctx, **(train_result or {})},
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
