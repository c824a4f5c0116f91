"""Weight snapshots at intermediate steps (`snapshot_every`), for analysis over training time.

Unlike checkpoints (optimizer state too, pruned to the last two), a snapshot holds only the
trainable tensors (safetensors) and its step, and is never pruned: `deltatune analyze` reads them
to follow how the weights moved (the DoRA paper's magnitude/direction protocol, the spectrum of
the update over time). Written atomically into <output>/snapshots/step-NNNNNNN/.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from deltatune.fileio import atomic_dir, remove_dir

SNAPSHOT_DIR = "snapshots"
WEIGHTS_FILE = "trainable.safetensors"  # the checkpoint's file name, so one reader handles both
META_FILE = "meta.json"


def snapshot_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"step-{step:07d}"


def save_snapshot(
    run_dir: Path, step: int, trainable: list[tuple[str, torch.nn.Parameter]], method: str, write: bool = True
) -> Path:
    """Save the trainable tensors at `step`. Sharded (FSDP) tensors are gathered, which every rank must
    join; only the rank with `write` writes."""
    tensors = {}
    for name, p in trainable:
        t = p.detach()
        if hasattr(t, "full_tensor"):  # a DTensor shard: all-gather the whole tensor
            t = t.full_tensor()
        tensors[name] = t.contiguous().cpu()
    path = snapshot_path(run_dir, step)
    if write:
        with atomic_dir(path) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_FILE))
            (tmp / META_FILE).write_text(
                json.dumps({"position": {"step": step}, "method": method, "kind": "snapshot"}, indent=2)
            )
    return path


def drop_snapshots_after(run_dir: Path, step: int) -> None:
    """On resume, remove the snapshots of steps after the checkpoint's: the resumed run trains those steps
    again, and where it changed `steps`/`epochs` (another schedule) or `snapshot_every` (other steps), the old
    ones were of weights this run never had, yet `analyze` read them beside its own (as metrics.jsonl is
    cut back to the checkpoint's step)."""
    root = Path(run_dir) / SNAPSHOT_DIR
    if not root.is_dir():
        return
    for path in root.iterdir():
        if path.name.startswith("step-") and path.name[5:].isdigit() and int(path.name[5:]) > step:
            remove_dir(path)
