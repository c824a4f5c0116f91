"""GPU smoke check and throughput: every training method for a few steps on CUDA, bf16.

Weights need not be real to check GPU paths and measure speed, so a model folder with only a
config and tokenizer (as carried to a lent GPU machine) is filled with random weights first.

    python benchmarks/gpu_check.py --model-config DIR --data gsm8k512.jsonl --out results.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

METHODS = ["lora", "full", "dora", "mora", "ia3", "qlora", "bitfit", "adapter", "prompt", "prefix", "lora+bitfit"]


def random_model_folder(config_dir: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(tempfile.mkdtemp(prefix="gpu-model-"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(config_dir).save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-config", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--out", default="gpu_check.json")
    args = p.parse_args()
    from deltatune.config import TrainConfig
    from deltatune.train.loop import train

    assert torch.cuda.is_available(), "no CUDA device"
    model_dir = random_model_folder(Path(args.model_config))
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": {}}
    for method in args.methods.split(","):
        out = Path(tempfile.mkdtemp(prefix=f"gpu-{method}-"))
        torch.cuda.reset_peak_memory_stats()
        lr = 2e-5 if method == "full" else 2e-4
        try:
            cfg = TrainConfig(
                model=str(model_dir),
                data=args.data,
                column_map={"question": "instruction", "answer": "output"},
                method=method,
                lr=lr,
                steps=args.steps,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
                output=str(out),
                eval_fraction=0.02,
                warmup_steps=0,
                log_every=10,
                precision="bf16",
            )
            t = time.perf_counter()
            r = train(cfg, quiet=True)
            metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
            t0 = next(m["elapsed_s"] for m in metrics if m["step"] == 5)
            toks = sum(m["tokens"] for m in metrics if m["step"] > 5)
            results["runs"][method] = {
                "ok": True,
                "tokens_per_s": toks / (metrics[-1]["elapsed_s"] - t0),
                "first_loss": metrics[0]["loss"],
                "last_loss": metrics[-1]["loss"],
                "eval_loss": r.eval_loss,
                "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20,
                "wall_s": time.perf_counter() - t,
            }
        except Exception as exc:  # report and go on: this is a smoke check of every path
            results["runs"][method] = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc()[-1500:],
            }
        shutil.rmtree(out, ignore_errors=True)
        print(method, json.dumps(results["runs"][method])[:400], flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
