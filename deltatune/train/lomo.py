"""LOMO-style fused update for full finetuning (Lv et al. 2023, "Full Parameter Fine-tuning for Large
Language Models with Limited Resources"; AdaLomo for the adaptive variant).

A plain step keeps every gradient alive until `optimizer.step()`: one full copy of the weights. Here
each parameter is updated inside its post-accumulate-grad hook during `backward()`, and its gradient is
freed right after, so at most the gradients of the parameters whose hooks have not yet fired exist at
once (in practice one parameter's worth). Autograd runs a leaf's accumulation only after every use of
that leaf has been differentiated, so updating it in place then is safe (tied embeddings included).

    fused = FusedUpdate(model.parameters(), lr=1e-5, weight_decay=0.0, algorithm="sgd" | "adamw")
    scheduler = torch.optim.lr_scheduler.LambdaLR(fused, ...)     # it is a torch Optimizer: lr in param_groups
    with fused.step_hooks_enabled():
        loss.backward()                # weights are updated here, gradients freed
    fused.step()                       # no-op for what the hooks updated (keeps schedulers' bookkeeping happy)
    scheduler.step()

Updates, per parameter, identical to torch's single-tensor implementations:
- "sgd" (LOMO): p <- p - lr·(g + wd·p), as torch.optim.SGD without momentum;
- "adamw": torch.optim.AdamW's update with per-parameter state (step, exp_avg, exp_avg_sq), decoupled
  weight decay. (Real AdaLomo uses factored second moments; this keeps AdamW's full state, which costs
  2x weights but still drops the gradient copy.)

Gradient clipping by the global norm needs every gradient before any update, which one pass cannot do:
- clip="per_param": each parameter's gradient is clipped to max_norm on its own (one pass; not the
  same as global clipping, it clips more parameters less);
- clip="global": LOMO's two-pass scheme. Run backward once inside `grad_norm_pass()` (gradients are
  reduced to their squared norms and freed), then again inside `step_hooks_enabled()`; the second pass
  scales every gradient by min(1, max_norm / (norm + 1e-6)), exactly like `clip_grad_norm_`. It costs a
  second backward (keep the graph with `retain_graph=True`, or recompute the forward).
Gradient accumulation over micro-batches is not possible (a gradient is consumed as soon as it
exists); use one micro-batch per step with the fused update.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch

from deltatune.errors import ConfigError

ALGORITHMS = ("sgd", "adamw")
CLIPS = ("none", "per_param", "global")


class FusedUpdate(torch.optim.Optimizer):
    def __init__(self, params: Iterable[torch.nn.Parameter] | Iterable[dict], lr: float, weight_decay: float = 0.0,
                 *, algorithm: str = "sgd", betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 clip: str = "none", max_norm: float | None = None) -> None:
        if algorithm not in ALGORITHMS:
            raise ConfigError(f"fused update algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}",
                              field="optimizer")
        if clip not in CLIPS:
            raise ConfigError(f"fused update clip must be one of {', '.join(CLIPS)}, got {clip!r}", field="clip")
        if clip != "none" and (max_norm is None or max_norm <= 0):
            raise ConfigError(f"clip={clip!r} needs a positive max_norm", field="max_grad_norm")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps))
        self.algorithm, self.clip, self.max_norm = algorithm, clip, max_norm
        self.clip_coef = 1.0  # set by grad_norm_pass, used by the next update pass
        self.last_grad_norm: float | None = None

    # --- the per-parameter update -----------------------------------------------------------------
    @torch.no_grad()
    def _update(self, p: torch.Tensor, group: dict) -> None:
        g = p.grad
        if self.clip == "per_param":
            norm = float(torch.linalg.vector_norm(g.float()))
            coef = self.max_norm / (norm + 1e-6)
            if coef < 1.0:
                g = g * coef
        elif self.clip_coef != 1.0:
            g = g * self.clip_coef
        lr, wd = group["lr"], group["weight_decay"]
        if self.algorithm == "sgd":
            if wd:
                g = g.add(p, alpha=wd)
            p.add_(g, alpha=-lr)
            return
        beta1, beta2 = group["betas"]
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] = state["step"] + 1  # not in place: a loaded state_dict may alias another optimizer's
        step = float(state["step"])
        p.mul_(1 - lr * wd)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = lr / (1 - beta1 ** step)
        denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(group["eps"])
        p.addcdiv_(exp_avg, denom, value=-step_size)

    def _params(self) -> Iterator[tuple[torch.nn.Parameter, dict]]:
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    yield p, group

    @contextmanager
    def _hooks(self, fn) -> Iterator[None]:
        handles = [p.register_post_accumulate_grad_hook(lambda t, g=group: fn(t, g)) for p, group in self._params()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # --- public API -----------------------------------------------------------------------------------
    @contextmanager
    def step_hooks_enabled(self) -> Iterator[None]:
        """Within the block, `backward()` updates each parameter as soon as its gradient is complete and
        frees that gradient. With clip="global", run `grad_norm_pass()` first."""
        if self.clip == "global" and self.last_grad_norm is None:
            raise ConfigError("clip='global' needs a grad_norm_pass() backward before the update pass", field="clip")

        def update_and_free(p: torch.Tensor, group: dict) -> None:
            self._update(p, group)
            p.grad = None

        try:
            with self._hooks(update_and_free):
                yield
        finally:
            self.clip_coef, self.last_grad_norm = 1.0, None

    @contextmanager
    def grad_norm_pass(self) -> Iterator[None]:
        """First pass of global clipping: backward inside this block only measures the global gradient
        norm (freeing each gradient at once); it sets `clip_coef` for the next `step_hooks_enabled()`."""
        norms: list[torch.Tensor] = []  # one scalar per parameter, reduced as clip_grad_norm_ does

        def accumulate_and_free(p: torch.Tensor, group: dict) -> None:
            norms.append(torch.linalg.vector_norm(p.grad))
            p.grad = None

        with self._hooks(accumulate_and_free):
            yield
        norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
        self.last_grad_norm = norm
        self.clip_coef = min(1.0, self.max_norm / (norm + 1e-6)) if self.max_norm else 1.0

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - torch's signature
        """Apply the same update to any parameter that still holds a gradient (backward run outside
        `step_hooks_enabled()`); a no-op after a fused backward. Schedulers expect it to be called."""
        loss = closure() if closure is not None else None
        for p, group in self._params():
            if p.grad is not None:
                self._update(p, group)
        return loss
