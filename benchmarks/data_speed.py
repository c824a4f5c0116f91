"""Data-path speed: examples/s from a JSONL file to tokenized, role-tagged, masked and packed examples.

GSM8K train (7,473 examples) with the default model's real tokenizer (SmolLM2-135M-Instruct).
Stages timed separately: prepare (read, validate, render the template, tokenize once in a batched
Rust call, tag each token's role by its character offsets), mask (a loss policy's weights for every
example), pack (best-fit into rows of --seq-len). Side by side in the same run, a naive baseline
that many scripts use: per example, tokenize the prompt and the full text separately (unbatched)
and mask the labels by the prompt's length. Also: collate into batch tensors (the per-step cost,
paid lazily by the training loop) and padding waste packed vs padded.

    python benchmarks/data_speed.py [--data ../shared/data/gsm8k/train.jsonl] [--repeats 3] [--seq-len 1024]

Writes benchmarks/results/data_speed.json. Repeats are interleaved across pipelines and the best of each is kept (the machine is shared);
CPU seconds (all threads of the process) are reported beside wall seconds because they barely depend on
other processes' load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAP = {"question": "instruction", "answer": "output"}


def best_of(repeats: int, fn):
    """Best and median wall time of `fn`, its best CPU time (all threads of this process), and its output."""
    times, cpus, out = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return min(times), statistics.median(times), min(cpus), out


def naive_baseline(path: Path, tokenizer, limit: int | None = None) -> int:
    """Per-example ChatML render, prompt and full text tokenized separately, labels masked by prompt length."""
    n = 0
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            prompt = f"<|im_start|>user\n{rec['question']}<|im_end|>\n<|im_start|>assistant\n"
            full = prompt + rec["answer"] + "<|im_end|>\n"
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            labels = [-100] * len(p_ids) + ids[len(p_ids) :]
            assert len(labels) == len(ids)
            n += 1
            if limit and n >= limit:
                break
    return n


def main() -> int:
    from deltatune.data.masking import LossPolicy, policy_weights
    from deltatune.data.packing import collate, pack_examples, padding_waste
    from deltatune.data.pipeline import prepare_dataset
    from deltatune.models import load_tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_speed.json"))
    args = ap.parse_args()
    path = Path(args.data)
    tok = load_tokenizer(args.model)
    policy = LossPolicy("instruction")

    def ours(template: str) -> dict:
        """One pass of the whole path; wall and CPU seconds per stage."""
        out = {}
        w0, c0 = time.perf_counter(), time.process_time()
        data = prepare_dataset(path, tok, template=template, column_map=MAP, max_len=args.seq_len)
        w1 = time.perf_counter()
        for ex in data.examples:
            ex.weights = policy_weights(ex, policy)
        w2 = time.perf_counter()
        rows = pack_examples(data.examples, args.seq_len, shuffle_seed=0)
        w3, c3 = time.perf_counter(), time.process_time()
        out.update(
            prepare_s=w1 - w0,
            mask_s=w2 - w1,
            pack_s=w3 - w2,
            total_s=w3 - w0,
            cpu_s=c3 - c0,
            examples=len(data.examples),
            tokens=sum(len(e) for e in data.examples),
            packed_rows=len(rows),
        )
        return out

    def naive() -> dict:
        w0, c0 = time.perf_counter(), time.process_time()
        n = naive_baseline(path, tok)
        return {"total_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0, "examples": n}

    # Interleaved repeats: every pipeline sees the same moments of a shared machine; keep each one's best.
    pipelines = {
        "chatml": lambda: ours("chatml"),
        "alpaca": lambda: ours("alpaca"),
        "tokenizer": lambda: ours("tokenizer"),
        "naive": naive,
    }
    runs: dict[str, list[dict]] = {k: [] for k in pipelines}
    for _ in range(args.repeats):
        for name, fn in pipelines.items():
            runs[name].append(fn())
    rows_out = []
    for name in ("chatml", "alpaca", "tokenizer"):
        best = min(runs[name], key=lambda r: r["total_s"])
        best_cpu = min(r["cpu_s"] for r in runs[name])
        rows_out.append(
            {
                "template": name,
                **best,
                "median_total_s": statistics.median(r["total_s"] for r in runs[name]),
                "best_cpu_s": best_cpu,
                "examples_per_s": best["examples"] / best["total_s"],
                "tokens_per_s": best["tokens"] / best["total_s"],
                "examples_per_cpu_s": best["examples"] / best_cpu,
            }
        )
    nb = min(runs["naive"], key=lambda r: r["total_s"])
    n_naive, t_naive = nb["examples"], nb["total_s"]
    c_naive = min(r["cpu_s"] for r in runs["naive"])
    chatml = rows_out[0]
    baseline = {
        "examples": n_naive,
        "total_s": t_naive,
        "median_total_s": statistics.median(r["total_s"] for r in runs["naive"]),
        "examples_per_s": n_naive / t_naive,
        "best_cpu_s": c_naive,
        "examples_per_cpu_s": n_naive / c_naive,
    }

    # collate cost per batch of packed rows (4D masks) and of padded batches
    data = prepare_dataset(path, tok, template="chatml", column_map=MAP, max_len=args.seq_len)
    rows = pack_examples(data.examples, args.seq_len, shuffle_seed=0)
    t_coll, _, _, _ = best_of(
        1,
        lambda: [
            collate(
                rows[i : i + args.batch_size],
                policy,
                seq_len=args.seq_len,
                pad_id=tok.pad_token_id,
                packed=True,
                template_name="chatml",
            )
            for i in range(0, min(len(rows), 64 * args.batch_size), args.batch_size)
        ],
    )
    n_coll = min(len(rows), 64 * args.batch_size)
    waste = {
        str(s): padding_waste(
            prepare_dataset(path, tok, template="chatml", column_map=MAP, max_len=s).examples,
            s,
            args.batch_size,
            shuffle_seed=0,
        )
        for s in (512, args.seq_len)
    }

    result = {
        "what": "GSM8K train -> tokenized, role-tagged, masked (instruction policy), packed; best of repeats",
        "data": str(path),
        "tokenizer": getattr(tok, "name_or_path", "") or "default model",
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "seq_len": args.seq_len,
        "repeats": args.repeats,
        "ours": rows_out,
        "naive_baseline": baseline,
        "speedup_chatml_vs_naive": chatml["examples_per_s"] / baseline["examples_per_s"],
        "cpu_speedup_chatml_vs_naive": chatml["examples_per_cpu_s"] / baseline["examples_per_cpu_s"],
        "collate_packed_rows_per_s": n_coll / t_coll,
        "batch_size": args.batch_size,
        "padding_waste": {k: {"packed": v["packed_waste"], "padded": v["padded_waste"]} for k, v in waste.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out)

    print(
        f"data path speed on {path.name} ({chatml['examples']} examples), {os.cpu_count()} CPUs, best of {args.repeats}"
    )
    print(
        f"{'pipeline':<34} {'prepare s':>9} {'mask s':>7} {'pack s':>7} {'total s':>8} {'examples/s':>11} "
        f"{'tokens/s':>10} {'CPU s':>6} {'ex/CPU-s':>9}"
    )
    for r in rows_out:
        print(
            f"{'deltatune, template ' + r['template']:<34} {r['prepare_s']:>9.3f} {r['mask_s']:>7.3f} {r['pack_s']:>7.3f} "
            f"{r['total_s']:>8.3f} {r['examples_per_s']:>11,.0f} {r['tokens_per_s']:>10,.0f} {r['best_cpu_s']:>6.2f} "
            f"{r['examples_per_cpu_s']:>9,.0f}"
        )
    print(
        f"{'naive: 2 unbatched calls/example':<34} {'':>9} {'':>7} {'':>7} {t_naive:>8.3f} {baseline['examples_per_s']:>11,.0f} "
        f"{'':>10} {baseline['best_cpu_s']:>6.2f} {baseline['examples_per_cpu_s']:>9,.0f}"
    )
    print(
        f"load average at start: {result['load_average_at_start']:.1f} on {os.cpu_count()} CPUs "
        "(above the CPU count, wall times include waiting for other processes; CPU time does not)"
    )
    print(
        f"speed-up (chatml vs naive): {result['speedup_chatml_vs_naive']:.1f}x wall, "
        f"{result['cpu_speedup_chatml_vs_naive']:.1f}x CPU; "
        f"collate: {result['collate_packed_rows_per_s']:,.0f} packed rows/s of {args.seq_len} tokens"
    )
    for k, v in result["padding_waste"].items():
        print(
            f"padding waste at seq_len {k}, batch {args.batch_size}: packed {100 * v['packed']:.1f}% vs padded {100 * v['padded']:.1f}%"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
