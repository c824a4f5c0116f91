"""AdamW and the learning-rate schedule (linear warm-up, then cosine, linear or constant)."""

from __future__ import annotations

import math

import torch

from deltatune.config import TrainConfig
from deltatune.methods.base import VECTOR_ATTR


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with torch's fused kernel on CPU and CUDA; no weight decay on biases, norms and 1-D vectors.

    Fused, not foreach, on CPU too: there `foreach` falls back to one op per tensor, each writing a fresh
    temporary as large as the weight (the tied embedding's is 113 MB in fp32), and full finetuning of the
    default model's update took 490 ms a step against 68 ms fused (benchmarks/optimizer_step.py).
    """
    groups = decay_groups(params, cfg.weight_decay)
    kwargs = {"fused": True} if fused_supported(params) else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **kwargs)


def is_vector(p: torch.nn.Parameter) -> bool:
    return p.ndim < 2 or bool(getattr(p, VECTOR_ATTR, False))


def decay_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """Parameter groups with `weight_decay` on matrices and none on biases, norms and other vectors (a matrix
    with one row is a matrix: LoRA's A at rank 1; a vector stored as a matrix says so, see `VECTOR_ATTR`)."""
    decay = [p for p in params if not is_vector(p)]
    no_decay = [p for p in params if is_vector(p)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def fused_supported(params: list[torch.nn.Parameter]) -> bool:
    """Whether torch's fused AdamW takes these: floating tensors, all on one CPU or CUDA device."""
    devices = {p.device for p in params}
    return (
        len(devices) == 1
        and next(iter(devices)).type in ("cpu", "cuda")
        and all(p.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64) for p in params)
    )


KERNEL_KEYS = ("fused", "foreach")  # how the update runs: this run's choice, never a checkpoint's


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict`, keeping this run's kernel. torch takes the saved groups' `fused`/`foreach`
    flags, so a checkpoint of an earlier version (foreach on CPU) would otherwise resume on the slow path."""
    kernel = [{k: g.get(k) for k in KERNEL_KEYS} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, kernel):
        group.update(flags)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * total))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warm = warmup_steps(cfg, total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warm, cfg.schedule))


def reschedule(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set each group's rate to this run's schedule at the scheduler's step (as `LambdaLR.step` computes it).

    A checkpoint's optimizer state holds the rate its own schedule gave the next step; a resume that changes
    the run's length (`steps`, `epochs`) has another schedule, whose first resumed step ran at the old rate
    (0 after `steps 3 -> 6` under cosine). With the length unchanged this is the saved rate, bit for bit."""
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
