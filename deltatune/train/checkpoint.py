"""Checkpoints: trainable weights (safetensors) + optimizer, scheduler, data position and RNG states.

Each checkpoint is written into a temporary folder and renamed into place, so a crash (even
SIGKILL) never leaves a half-written checkpoint; `latest` is found by scanning for the highest
complete step. meta.json records each file's size and SHA-256, and the weights file's header holds the
position meta.json gives, so that a checkpoint damaged afterwards (a bad disk, a copy cut short, an edited
meta.json) is recognised before it is used (`verify_checkpoint`),
and resume falls back to the newest intact one (see train/run_folder.py). Adapter methods save
only their trainable tensors; full finetuning saves all (trainable) parameters, which
`named_parameters()` lists once even when tied.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from deltatune.fileio import atomic_dir, remove_dir
from deltatune.train.optim import load_optimizer_state

STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "trainable.safetensors"
META_FILE = "meta.json"
POSITION_KEY = "deltatune.position"  # the weights file's header holds the position too


@dataclass
class Position:
    """Where training is: optimizer steps done, and the next micro-batch to read."""

    step: int = 0
    epoch: int = 0
    micro: int = 0  # index of the next micro-batch within `epoch`
    best_eval: float | None = None
    loss: float | None = None  # the last step's training loss: what a resume that trains no further step reports


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


def restore_rng(state: dict, rank: int = 0, world: int = 1) -> None:
    """This process's random streams from a checkpoint's state: its own where the checkpoint kept every process's
    (`rng_ranks`, written by the same number of processes), else ones derived from the first process's and this
    rank (as `seed_own_streams` does for a fresh run)."""
    per_rank = state.get("rng_ranks")
    if per_rank and len(per_rank) == world:
        _set_rng_state(per_rank[rank])
        return
    _set_rng_state(state["rng"])
    if world > 1:  # another process count: every rank would draw the first one's dropout masks for its own rows
        drawn = int(torch.randint(2**62, (1,)).item())  # from the restored stream: the same resume, the same seeds
        mixed = (drawn * 1_000_003 + rank) % 2**63
        torch.manual_seed(mixed)
        random.seed(mixed)


def save_checkpoint(
    path: Path,
    trainable: list[tuple[str, torch.nn.Parameter]],
    optimizer,
    scheduler,
    position: Position,
    extra: dict | None = None,
    rng_ranks: list[dict] | None = None,
) -> Path:
    """`rng_ranks`: every process's random streams, in rank order (several processes)."""
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()}
    if rng_ranks is not None:
        state["rng_ranks"] = rng_ranks
    with atomic_dir(path) as tmp:
        tensors = {n: p.detach().contiguous().cpu() for n, p in trainable}
        # the position again inside a hashed file: meta.json itself has no hash (see verify_checkpoint)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={POSITION_KEY: json.dumps(asdict(position))})
        torch.save(state, tmp / STATE_FILE)
        files = {name: _fingerprint(tmp / name) for name in (WEIGHTS_FILE, STATE_FILE)}
        (tmp / META_FILE).write_text(
            json.dumps({"position": asdict(position), "files": files, **(extra or {})}, indent=2)
        )
        with open(tmp / META_FILE, "rb") as fh:
            os.fsync(fh.fileno())
    return path


def _fingerprint(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def read_meta(path: Path) -> dict:
    """A checkpoint's meta.json; raises ValueError if it is unreadable or not a checkpoint's: its position must
    be a Position's fields of their types, at the step the folder is named for."""
    try:
        meta = json.loads((path / META_FILE).read_text())
        position = Position(**meta["position"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{META_FILE} unreadable ({type(exc).__name__})") from None
    counts = (position.step, position.epoch, position.micro)
    losses = (position.best_eval, position.loss)
    if not all(type(c) is int and c >= 0 for c in counts) or not all(
        x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in losses
    ):
        raise ValueError(f"{META_FILE} holds a position of other types ({meta['position']})")
    named = path.name[len("step-") :]
    if path.name.startswith("step-") and named.isdigit() and int(named) != position.step:
        raise ValueError(f"{META_FILE} says step {position.step}, the folder step {int(named)}")
    return meta


def verify_checkpoint(
    path: Path, shapes: dict[str, tuple[int, ...]] | None = None, *, hashes: bool = True
) -> str | None:
    """None if the checkpoint at `path` is intact (every file present, of the recorded size and hash,
    the weights readable, with exactly the names and shapes in `shapes` when given); else why not.
    `hashes=False` skips re-reading the files (when they were just verified)."""
    from safetensors import safe_open

    try:
        meta = read_meta(path)
    except ValueError as exc:
        return str(exc)
    for name in (WEIGHTS_FILE, STATE_FILE):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        recorded = meta.get("files", {}).get(name)
        try:
            if recorded is not None and hashes and _fingerprint(file) != recorded:
                return f"{name} differs from what was written (size or SHA-256)"
        except OSError as exc:
            return f"{name} unreadable ({exc.strerror})"
    try:
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as fh:
            found = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
            header = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error type for a damaged header
        return f"{WEIGHTS_FILE} unreadable ({type(exc).__name__})"
    if POSITION_KEY in header and json.loads(header[POSITION_KEY]) != meta["position"]:  # older ones have none
        return f"{META_FILE}'s position differs from the one written with the weights"
    if shapes is not None and found != {k: tuple(v) for k, v in shapes.items()}:
        missing = sorted(set(shapes) - set(found))
        other = sorted(k for k in set(shapes) & set(found) if tuple(shapes[k]) != found[k])
        what = (
            f"lacks {missing[0]}"
            if missing
            else f"{other[0]} has shape {found[other[0]]}, the model {tuple(shapes[other[0]])}"
            if other
            else f"has {sorted(set(found) - set(shapes))[0]}, unknown here"
        )
        return f"does not fit this model and method ({what})"
    return None


def load_checkpoint(
    path: Path,
    trainable: list[tuple[str, torch.nn.Parameter]],
    optimizer,
    scheduler,
    *,
    rank: int = 0,
    world: int = 1,
) -> Position:
    """Weights, optimizer and scheduler state, and this process's (`rank` of `world`) random streams."""
    from deltatune.errors import ConfigError

    weights = load_file(str(path / WEIGHTS_FILE))
    params = dict(trainable)
    missing = set(params) - set(weights)
    if missing:
        raise ConfigError(
            f"checkpoint {path} lacks {sorted(missing)[:3]} (different method or targets?)", field="resume"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.device))
    state = torch.load(path / STATE_FILE, weights_only=True)
    try:
        load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError) as exc:
        groups = "parameter groups" in str(exc)  # the decay groups changed: IA3's vectors, LOMO (2026-12-07)
        hint = (
            "; a checkpoint written before 2026-12-07 with IA3 or LOMO and weight decay grouped its parameters "
            "otherwise: finish it with the deltatune that started it, or start anew"
            if groups
            else ""
        )
        raise ConfigError(
            f"checkpoint {path}: the optimizer state does not fit this run ({str(exc)[:100]}){hint}", field="resume"
        ) from None
    restore_rng(state, rank, world)
    meta = json.loads((path / META_FILE).read_text())
    return Position(**meta["position"])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a complete one has its meta file; temp folders are hidden)."""
    root = run_dir / "checkpoints"
    if not root.exists():
        return []
    done = [
        p for p in root.iterdir() if p.name.startswith("step-") and p.name[5:].isdigit() and (p / META_FILE).exists()
    ]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        try:
            remove_dir(old)  # in place, a kill mid-way left a step folder without meta.json, for good
        except OSError:  # another process removed it, or no permission: training goes on, as it did before
            pass
