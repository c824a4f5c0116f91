"""Shared by the reliability tests: run the CLI in-process, snapshot folders, make tiny runs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def read_metrics(run: Path) -> list[dict]:
    """A run folder's metrics.jsonl, one dict a line."""
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`deltatune ARGV` in this process: (exit code, stdout, stderr). argparse's exits count as codes."""
    from deltatune.cli import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under `roots` with its kind, mode, size and content hash (folders: their listing)."""
    state: dict[str, tuple] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            state[str(root)] = ("absent",)
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            state[dirpath] = ("dir", os.stat(dirpath).st_mode, tuple(sorted(dirnames + filenames)))
            for name in filenames:
                p = Path(dirpath) / name
                state[str(p)] = ("file", p.stat().st_mode, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return state


def train_args(model: Path, data: Path, out: Path, *extra: str, steps: int = 3) -> list[str]:
    """A fast tiny LoRA run (fp32, compiled norms off)."""
    return [
        "train",
        "--model",
        model,
        "--data",
        data,
        "--output",
        out,
        "--method",
        "lora",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--lr",
        "5e-3",
        "--batch-size",
        "4",
        "--seq-len",
        "64",
        "--precision",
        "fp32",
        "--steps",
        str(steps),
        "--seed",
        "3",
        "--set",
        "fused_norms=off",
        "--set",
        "warmup_steps=0",
        "--set",
        "eval_fraction=0.1",
        "--quiet",
        *extra,
    ]
