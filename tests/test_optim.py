"""The optimizer deltatune trains with: torch's fused AdamW on CPU, checked against AdamW's definition in float64,
and a checkpoint written by the foreach kernel resumes on the fused one."""

from __future__ import annotations

import copy

import torch

from deltatune.config import TrainConfig
from deltatune.train.optim import build_optimizer, fused_supported, load_optimizer_state

LR, WD, BETAS, EPS = 1e-2, 0.1, (0.9, 0.95), 1e-8


def two_params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(6, 5, generator=g)),  # a weight: decayed
        torch.nn.Parameter(torch.randn(5, generator=g)),  # a norm or bias: not decayed
    ]


def gradients(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(6, 5, generator=g), torch.randn(5, generator=g)]


def adamw_float64(p0: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
    """AdamW by its definition (Loshchilov & Hutter: decay decoupled from the moments), in float64."""
    params = [p.double().clone() for p in p0]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    b1, b2 = BETAS
    for t in range(1, steps + 1):
        for i, (p, g) in enumerate(zip(params, gradients(t))):
            g = g.double()
            p.mul_(1 - LR * (WD if p.ndim >= 2 else 0.0))
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            p.sub_(LR * m_hat / (v_hat.sqrt() + EPS))
    return params


def run(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: range) -> None:
    for t in steps:
        for p, g in zip(params, gradients(t)):
            p.grad = g.clone()
        optimizer.step()


def config() -> TrainConfig:
    return TrainConfig(lr=LR, weight_decay=WD, betas=BETAS)


def test_cpu_adamw_is_fused_and_matches_the_definition():
    params = two_params()
    start = [p.detach().clone() for p in params]
    optimizer = build_optimizer(params, config())
    assert all(g["fused"] for g in optimizer.param_groups)  # not foreach's per-tensor fallback on CPU
    assert [g["weight_decay"] for g in optimizer.param_groups] == [WD, 0.0]
    run(optimizer, params, range(1, 6))
    for got, want in zip(params, adamw_float64(start, 5)):
        torch.testing.assert_close(got.detach().double(), want, rtol=1e-6, atol=1e-6)


def test_foreach_checkpoint_resumes_on_the_fused_kernel_and_continues_the_same():
    """Checkpoints of earlier versions hold `foreach: True` in their groups; torch's load_state_dict would take
    those flags and resume on the slow path. The resumed run keeps fused and lands where foreach would."""
    old_params = two_params()
    old = torch.optim.AdamW(
        [{"params": [old_params[0]], "weight_decay": WD}, {"params": [old_params[1]], "weight_decay": 0.0}],
        lr=LR,
        betas=BETAS,
        foreach=True,
    )
    run(old, old_params, range(1, 3))
    saved = copy.deepcopy(old.state_dict())  # as read back from a checkpoint: no tensor shared with `old`

    params = [torch.nn.Parameter(p.detach().clone()) for p in old_params]
    resumed = build_optimizer(params, config())
    load_optimizer_state(resumed, saved)
    assert all(g["fused"] and not g["foreach"] for g in resumed.param_groups)
    run(resumed, params, range(3, 5))
    run(old, old_params, range(3, 5))
    for got, want in zip(params, old_params):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert resumed.state[params[0]]["step"].item() == 4


def test_fused_only_where_torch_has_the_kernel():
    assert fused_supported(two_params())
    assert not fused_supported([torch.nn.Parameter(torch.zeros(2, device="meta"))])
    assert not fused_supported([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])
