"""Checkpoints: trainable weights (safetensors) + optimizer, scheduler, data position and RNG states.

Each checkpoint is written into a temporary folder and renamed into place, so a crash (even
SIGKILL) never leaves a half-written checkpoint; `latest` is found by scanning for the highest
complete step. Adapter methods save only their trainable tensors; full finetuning saves all
(trainable) parameters, which `named_parameters()` lists once even when tied.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from deltatune.fileio import atomic_dir

STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "trainable.safetensors"
META_FILE = "meta.json"


@dataclass
class Position:
    """Where training is: optimizer steps done, and the next micro-batch to read."""

    step: int = 0
    epoch: int = 0
    micro: int = 0  # index of the next micro-batch within `epoch`
    best_eval: float | None = None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, trainable: list[tuple[str, torch.nn.Parameter]], optimizer, scheduler,
                    position: Position, extra: dict | None = None) -> Path:
    with atomic_dir(path) as tmp:
        save_file({n: p.detach().contiguous().cpu() for n, p in trainable}, str(tmp / WEIGHTS_FILE))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": _rng_state()}, tmp / STATE_FILE)
        (tmp / META_FILE).write_text(json.dumps({"position": asdict(position), **(extra or {})}, indent=2))
        with open(tmp / META_FILE, "rb") as fh:
            os.fsync(fh.fileno())
    return path


def load_checkpoint(path: Path, trainable: list[tuple[str, torch.nn.Parameter]], optimizer, scheduler) -> Position:
    weights = load_file(str(path / WEIGHTS_FILE))
    params = dict(trainable)
    missing = set(params) - set(weights)
    if missing:
        raise RuntimeError(f"checkpoint {path} lacks {sorted(missing)[:3]}... (different method or targets?)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.device))
    state = torch.load(path / STATE_FILE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    meta = json.loads((path / META_FILE).read_text())
    return Position(**meta["position"])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a complete one has its meta file; temp folders are hidden)."""
    root = run_dir / "checkpoints"
    if not root.exists():
        return []
    done = [p for p in root.iterdir() if p.name.startswith("step-") and (p / META_FILE).exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
