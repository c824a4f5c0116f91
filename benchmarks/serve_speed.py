"""Serving speed: many adapters in one batch against one merged adapter, merged against unmerged latency,
and the engine against plain transformers `generate`.

    python benchmarks/serve_speed.py [--model default|tiny|PATH] [--batch 16] [--new-tokens 32] [--repeats 3]

Measured, all greedy with end-of-sequence ignored (every row makes exactly --new-tokens tokens), same prompts:
- tokens/s of a batch of --batch rows: one adapter merged into the weights (the baseline: one task per
  batch); the same adapter unmerged; 4 and 16 distinct LoRA adapters, rows spread over them (the gathered path);
- latency of one request (batch 1): the base model, the adapter merged, the adapter unmerged;
- tokens/s of deltatune's engine against transformers' `generate` on the base model, same batch.
Targets (issue 11): 16 distinct adapters >= 0.7x the merged adapter's tokens/s; merged within 3% of the
base latency. Repeats are interleaved; each case reports its median and spread (max - min, % of the median).
Writes benchmarks/results/serve_speed.json and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import command_line  # noqa: E402

PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "Explain what a neural network is.",
    "Give three tips for staying healthy.",
    "Translate 'good morning' into Spanish.",
    "What is 17 times 23?",
    "Summarise the plot of Hamlet in one sentence.",
]


def cpu_info() -> dict:
    model, flags = platform.processor() or "unknown", []
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name") and model in ("unknown", "", "x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = sorted(
                    have
                    & {
                        "avx",
                        "avx2",
                        "fma",
                        "avx512f",
                        "avx512_bf16",
                        "avx512_vnni",
                        "amx_bf16",
                        "amx_tile",
                        "neon",
                        "asimd",
                    }
                )
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "flags": flags,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def load_base(name: str):
    from deltatune.models import load_model
    from deltatune.testing import tiny_model, tiny_tokenizer

    if name == "tiny":
        return tiny_model(0, initializer_range=0.2), tiny_tokenizer(), "tiny"
    model, tok = load_model(None if name == "default" else name)
    return model, tok, name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="default (SmolLM2-135M-Instruct), tiny, or a model folder")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_speed.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from deltatune.methods.base import MethodSpec
    from deltatune.serve import Engine, GenRequest, MultiAdapterModel, SamplingParams

    base, tok, model_name = load_base(args.model)
    spec = MethodSpec(name="lora", rank=args.rank, alpha=2 * args.rank)
    tmp = Path(tempfile.mkdtemp(prefix="serve_speed."))
    print(f"building 16 random LoRA adapters (rank {args.rank}, all linears) in {tmp}", flush=True)
    folders = random_adapters(tmp, spec, base, 16)

    merged_engine = Engine(MultiAdapterModel(merged_copy(base, folders[0])), tok)  # before base is wrapped
    multi = MultiAdapterModel(base)
    for i, folder in enumerate(folders):
        multi.load(f"a{i}", folder)
    engine = Engine(multi, tok)
    for e in (engine, merged_engine):
        e.stop_ids = set()  # every row makes exactly --new-tokens tokens

    prompts = [engine.encode(PROMPTS[i % len(PROMPTS)]) for i in range(args.batch)]
    n = args.new_tokens

    def run(e: Engine, adapters: list[str | None], rows: list[list[int]]) -> float:
        reqs = [
            GenRequest(prompt_ids=p, adapter=a, params=SamplingParams(max_tokens=n)) for p, a in zip(rows, adapters)
        ]
        t0 = time.perf_counter()
        e.generate(reqs)
        return time.perf_counter() - t0

    def hf_generate(model, rows: list[list[int]]) -> float:
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=pad,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        return time.perf_counter() - t0

    b = args.batch
    cases = {
        "merged adapter": lambda: run(merged_engine, [None] * b, prompts),
        "1 adapter, unmerged": lambda: run(engine, ["a0"] * b, prompts),
        "4 distinct adapters": lambda: run(engine, [f"a{i % 4}" for i in range(b)], prompts),
        "16 distinct adapters": lambda: run(engine, [f"a{i % 16}" for i in range(b)], prompts),
        "base, deltatune engine": lambda: run(engine, [None] * b, prompts),
        "base, transformers generate": lambda: hf_generate(multi.model, prompts),
        "latency: base": lambda: run(engine, [None], prompts[:1]),
        "latency: merged adapter": lambda: run(merged_engine, [None], prompts[:1]),
        "latency: unmerged adapter": lambda: run(engine, ["a0"], prompts[:1]),
    }
    print("warm-up", flush=True)
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for rep in range(args.repeats):
        print(f"repeat {rep + 1}/{args.repeats}", flush=True)
        for k, fn in cases.items():
            times[k].append(fn())

    rows = []
    for k, runs in times.items():
        tokens, sec = n * (1 if k.startswith("latency") else b), statistics.median(runs)
        rows.append(
            {
                "case": k,
                "seconds": round(sec, 4),
                "spread_pct": round(100 * (max(runs) - min(runs)) / sec, 1),
                "all_seconds": [round(t, 4) for t in runs],
                "tokens": tokens,
                "tokens_per_s": round(tokens / sec, 1),
            }
        )
    tps = {r["case"]: r["tokens_per_s"] for r in rows}
    sec = {r["case"]: r["seconds"] for r in rows}
    checks = {
        "16 distinct / merged tokens/s (target >= 0.7)": round(tps["16 distinct adapters"] / tps["merged adapter"], 3),
        "4 distinct / merged tokens/s": round(tps["4 distinct adapters"] / tps["merged adapter"], 3),
        "merged / base latency (target <= 1.03)": round(sec["latency: merged adapter"] / sec["latency: base"], 3),
        "unmerged / merged latency": round(sec["latency: unmerged adapter"] / sec["latency: merged adapter"], 3),
        "engine / transformers generate tokens/s": round(
            tps["base, deltatune engine"] / tps["base, transformers generate"], 3
        ),
    }
    result = {
        "command": command_line(),
        "model": model_name,
        "batch": b,
        "new_tokens": n,
        "rank": args.rank,
        "repeats": args.repeats,
        "machine": cpu_info(),
        "results": rows,
        "ratios": checks,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    print(
        f"\nmodel {model_name}, batch {b}, {n} new tokens, LoRA rank {args.rank}; {m['cpu']} "
        f"[{' '.join(m['flags'])}], {m['threads']} threads, torch {m['torch']}\n"
    )
    print("| case | seconds (median) | spread | tokens | tokens/s |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['case']} | {r['seconds']:.3f} | {r['spread_pct']:.0f}% | {r['tokens']} | {r['tokens_per_s']:.1f} |"
        )
    print("\n| ratio | value |\n|---|---:|")
    for k, v in checks.items():
        print(f"| {k} | {v:.3f} |")
    print(f"\nwrote {out}")
    return 0


def random_adapters(root: Path, spec, base, count: int, std: float = 0.01) -> list[Path]:
    """`count` adapters of `spec` with different random weights, from one adapted copy of the base."""
    from deltatune.methods.apply import apply_methods

    adapted = apply_methods(copy.deepcopy(base), [spec])
    params = adapted.trainable_parameters()
    start = [p.detach().clone() for _, p in params]
    folders = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for (_, p), p0 in zip(params, start):
                p.copy_(p0 + torch.randn(p.shape, generator=g) * std)
        folders.append(adapted.save_adapter(root / f"a{i}"))
    return folders


def merged_copy(base, folder):
    """A copy of the base with the adapter merged into its weights: a plain transformers model again."""
    from deltatune.methods.apply import load_adapter

    return load_adapter(copy.deepcopy(base), folder).merge_and_unload()


if __name__ == "__main__":
    raise SystemExit(main())
