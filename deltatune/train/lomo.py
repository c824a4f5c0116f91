"""Updates fused into backward: real LOMO (Lv et al. 2023, "Full Parameter Fine-tuning for Large Language
Models with Limited Resources") and a fused AdamW (AdaLomo-like, kept under its own name).

A plain step keeps every gradient alive until `optimizer.step()`: one full copy of the weights. Here
each parameter is updated inside its post-accumulate-grad hook during `backward()`, and its gradient is
freed right after, so at most the gradients of the parameters whose hooks have not yet fired exist at
once (in practice one parameter's worth). Autograd runs a leaf's accumulation only after every use of
that leaf has been differentiated, so updating it in place then is safe (tied embeddings included).

Two optimizers, built by name (`build_fused("lomo" | "fused-adamw", ...)`):
- "lomo", the paper's method: plain SGD, p <- p - lr·(g + wd·p) (torch.optim.SGD without momentum), no
  optimizer state at all; gradient-norm clipping over ALL parameters by the paper's two backward
  passes (the first only measures the global norm, the second updates with the clipped gradient,
  exactly `clip_grad_norm_`), and dynamic loss scaling when a trained parameter is fp16 (the paper
  trains in 16 bits): the loss is multiplied by a scale before backward, gradients are divided by it,
  and a step whose first pass finds an inf/nan is skipped and the scale halved (doubled again after
  `growth_interval` clean steps).
- "fused-adamw": torch.optim.AdamW's update with per-parameter state (step, exp_avg, exp_avg_sq),
  decoupled weight decay, each gradient clipped to max_norm on its own (one pass: a global norm
  needs every gradient first). Not LOMO: it keeps AdamW's two state tensors per weight (AdaLomo
  factorises them); it only drops the gradient copy.

    opt = build_fused("lomo", params, lr=1e-2, max_norm=1.0)
    opt.backward(loss)            # one or two passes; weights are updated, gradients freed
    opt.step(); scheduler.step()  # step() is a no-op for what the hooks updated (schedulers expect it)

The lower-level protocol stays available: `with opt.grad_norm_pass(): loss.backward(retain_graph=True)`
then `with opt.step_hooks_enabled(): loss.backward()`. Gradient accumulation over micro-batches is not
possible (a gradient is consumed as soon as it exists); use one micro-batch per step.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch

from deltatune.errors import ConfigError

ALGORITHMS = ("sgd", "adamw")
CLIPS = ("none", "per_param", "global")
FUSED_OPTIMIZERS = ("lomo", "fused-adamw")


class FusedUpdate(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        lr: float,
        weight_decay: float = 0.0,
        *,
        algorithm: str = "sgd",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        clip: str = "none",
        max_norm: float | None = None,
        loss_scale: str | float | None = None,
        growth_interval: int = 1000,
    ) -> None:
        if algorithm not in ALGORITHMS:
            raise ConfigError(
                f"fused update algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}", field="optimizer"
            )
        if clip not in CLIPS:
            raise ConfigError(f"fused update clip must be one of {', '.join(CLIPS)}, got {clip!r}", field="clip")
        if clip != "none" and (max_norm is None or max_norm <= 0):
            raise ConfigError(f"clip={clip!r} needs a positive max_norm", field="max_grad_norm")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps))
        self.algorithm, self.clip, self.max_norm = algorithm, clip, max_norm
        if loss_scale is not None and clip == "per_param":
            raise ConfigError("loss scaling needs the two-pass protocol (clip 'global' or 'none')", field="clip")
        self.clip_coef = 1.0  # set by grad_norm_pass, used by the next update pass
        self.last_grad_norm: float | None = None
        self.dynamic_scale = loss_scale == "dynamic"
        self.scale = 2.0**16 if self.dynamic_scale else float(loss_scale or 1.0)
        self.growth_interval, self._good_steps = growth_interval, 0
        self.skipped_steps = 0
        self.overflow = False

    def state_dict(self) -> dict:
        """torch's optimizer state plus the loss scaling's own (scale, clean steps, skipped steps), so a resumed
        fp16 run goes on at the scale it had instead of starting again at 2^16."""
        state = super().state_dict()
        state["loss_scaling"] = {
            "scale": self.scale,
            "good_steps": self._good_steps,
            "skipped_steps": self.skipped_steps,
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        scaling = state_dict.pop("loss_scaling", None)  # absent in checkpoints from before it was saved
        super().load_state_dict(state_dict)
        if scaling is not None:
            self.scale = float(scaling["scale"])
            self._good_steps, self.skipped_steps = int(scaling["good_steps"]), int(scaling["skipped_steps"])

    @property
    def two_passes(self) -> bool:
        """Whether `backward` runs the norm pass first (global clipping, or loss scaling's overflow check)."""
        return self.clip == "global" or self.scale != 1.0 or self.dynamic_scale

    # --- the per-parameter update -----------------------------------------------------------------
    @torch.no_grad()
    def _update(self, p: torch.Tensor, group: dict) -> None:
        g = p.grad
        wide = torch.promote_types(g.dtype, torch.float32)  # fp16/bf16 -> fp32; float64 stays float64
        if self.scale != 1.0:
            g = g.to(wide) / self.scale
        if self.clip == "per_param":
            norm = float(torch.linalg.vector_norm(g, dtype=wide))
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
        step_size = lr / (1 - beta1**step)
        denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
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
        if self.two_passes and self.last_grad_norm is None:
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
            dtype = torch.promote_types(p.grad.dtype, torch.float32)  # float64 stays float64
            norms.append(torch.linalg.vector_norm(p.grad, dtype=dtype))
            p.grad = None

        with self._hooks(accumulate_and_free):
            yield
        norm = float(torch.linalg.vector_norm(torch.stack(norms))) / self.scale if norms else 0.0
        self.last_grad_norm = norm
        self.overflow = not torch.isfinite(torch.tensor(norm))
        clip = self.clip == "global" and self.max_norm
        self.clip_coef = min(1.0, self.max_norm / (norm + 1e-6)) if clip and not self.overflow else 1.0

    def backward(self, loss: torch.Tensor) -> bool:
        """Backward with the update fused in: one pass, or the norm pass then the update pass (global
        clipping, loss scaling). Returns False when the norm pass found inf/nan gradients: the step is
        skipped (and with dynamic loss scaling the scale halved)."""
        if not self.two_passes:
            with self.step_hooks_enabled():
                loss.backward()
            return True
        scaled = loss * self.scale if self.scale != 1.0 else loss
        with self.grad_norm_pass():
            scaled.backward(retain_graph=True)
        if self.overflow:  # inf/nan somewhere: no weight is touched (the loop then stops on the loss)
            if self.dynamic_scale:
                self.scale, self._good_steps = self.scale / 2, 0
            self.skipped_steps += 1
            self.last_grad_norm = None
            return False
        with self.step_hooks_enabled():
            scaled.backward()
        if self.dynamic_scale:
            self._good_steps += 1
            if self._good_steps % self.growth_interval == 0:
                self.scale *= 2
        return True

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - torch's signature
        """Apply the same update to any parameter that still holds a gradient (backward run outside
        `step_hooks_enabled()`); a no-op after a fused backward. Schedulers expect it to be called.

        Such gradients come from a plain `loss.backward()`: they are not loss-scaled, and global
        clipping needs their norm (all of them exist now), as `clip_grad_norm_` computes it."""
        loss = closure() if closure is not None else None
        held = [(p, group) for p, group in self._params() if p.grad is not None]
        if not held:
            return loss
        scale, coef = self.scale, self.clip_coef
        self.scale, self.clip_coef = 1.0, 1.0
        try:
            if self.clip == "global":
                norms = [
                    torch.linalg.vector_norm(p.grad, dtype=torch.promote_types(p.grad.dtype, torch.float32))
                    for p, _ in held
                ]
                norm = float(torch.linalg.vector_norm(torch.stack(norms)))
                self.clip_coef = min(1.0, self.max_norm / (norm + 1e-6))
            for p, group in held:
                self._update(p, group)
        finally:
            self.scale, self.clip_coef = scale, coef
        return loss


def retains_graph(name: str | bool, max_norm: float | None) -> bool:
    """Whether the fused update `name` runs backward twice on one graph (LOMO's global clipping), which
    compiled modules whose backward donates buffers (the fused RMSNorm) cannot do."""
    return name in (True, "lomo") and bool(max_norm)


def build_fused(
    name: str,
    params,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    max_norm: float | None = None,
) -> FusedUpdate:
    """ "lomo" (SGD, no state, global clipping by two passes, dynamic loss scaling for fp16 parameters) or
    "fused-adamw" (AdamW state, per-tensor clipping)."""
    from deltatune.train.optim import decay_groups

    params = list(params)
    if name == "lomo":  # no weight decay on biases, norms and vectors either, as every optimizer here
        half = any(p.dtype == torch.float16 for p in params if isinstance(p, torch.Tensor))
        return FusedUpdate(
            decay_groups(params, weight_decay) if weight_decay else params,  # one group: earlier runs resume
            lr=lr,
            weight_decay=weight_decay,
            algorithm="sgd",
            clip="global" if max_norm else "none",
            max_norm=max_norm,
            loss_scale="dynamic" if half else None,
        )
    if name == "fused-adamw":  # as the plain AdamW path: no weight decay on biases, norms and 1-D vectors
        return FusedUpdate(
            decay_groups(params, weight_decay),
            lr=lr,
            weight_decay=weight_decay,
            algorithm="adamw",
            betas=betas,
            clip="per_param" if max_norm else "none",
            max_norm=max_norm,
        )
    raise ConfigError(f"fused update must be one of {', '.join(FUSED_OPTIMIZERS)}, got {name!r}", field="fused_update")
