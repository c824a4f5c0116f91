"""Arguments the three examples share (not part of deltatune's API)."""

from __future__ import annotations

import argparse
from pathlib import Path

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=None, help="model folder or GGUF file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=str(GSM8K), help="training records (default: GSM8K's training split)")
    p.add_argument("--map", default="question=instruction,answer=output", help="rename the file's columns")
    p.add_argument("--limit", type=int, default=256, help="read at most this many records")
    p.add_argument("--policy", default="instruction", help="loss policy: response, instruction, weighted:0.1, ...")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=384, help="tokens per example (longer ones are truncated)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--output", default="runs/example")
    return p
