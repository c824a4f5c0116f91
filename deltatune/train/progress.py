"""Progress: a tqdm bar on a terminal, plain log lines otherwise; metrics to metrics.jsonl (+TensorBoard)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm


class Progress:
    def __init__(
        self,
        total_steps: int,
        start_step: int,
        metrics_path: Path,
        *,
        log_every: int,
        enabled: bool = True,
        tensorboard_dir: Path | None = None,
    ) -> None:
        self.enabled = enabled
        self.log_every = log_every
        self.total = total_steps
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(
            total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not (enabled and self.tty)
        )
        self.metrics = open(metrics_path, "a", encoding="utf-8")  # written even when quiet
        self.start_time = time.perf_counter()
        self.start_step = start_step
        self.tokens = 0
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # a resume hides the steps after its checkpoint that an earlier process logged (as metrics.jsonl
                # is cut back): TensorBoard's purge marker drops events of step >= purge_step
                self.tb = SummaryWriter(str(tensorboard_dir), purge_step=start_step + 1 if start_step else None)
            except Exception:  # tensorboard not installed: metrics.jsonl is enough
                self.tb = None

    def step(self, step: int, loss: float, lr: float, tokens: int, extra: dict | None = None) -> None:
        self.tokens += tokens
        elapsed = time.perf_counter() - self.start_time
        tps = self.tokens / max(elapsed, 1e-9)
        done = step - self.start_step
        eta = elapsed / max(done, 1) * (self.total - step)
        record = {
            "step": step,
            "loss": round(loss, 6),
            "lr": lr,
            "tokens": tokens,
            "tokens_per_s": round(tps, 1),
            "elapsed_s": round(elapsed, 2),
            **(extra or {}),
        }
        self.log(record)
        if not self.enabled:
            return
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}", refresh=False)
        # the first step too: it carries the warm-up (compilation, first touches), minutes on a large model
        if not self.tty and (step % self.log_every == 0 or step == self.total or step == self.start_step + 1):
            print(f"step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} {tps:.0f} tok/s eta {eta:.0f}s", flush=True)

    def log(self, record: dict) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.tty else print)(text)

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()
        if self.tb is not None:
            self.tb.close()
