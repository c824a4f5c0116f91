"""benchmarks/loss_head.py times the computation the loss module does, and its fused variant is the same one."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from loss_head import eager_chain, fused_chain  # noqa: E402


def test_both_chains_give_the_weighted_loss_and_the_softmax_gradient_of_the_logits():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 40, generator=g) * 3).to(torch.bfloat16)
    t = torch.randint(0, 40, (6,), generator=g)
    tw = torch.rand(6, generator=g)
    z = logits.float().requires_grad_()
    expected = (torch.nn.functional.cross_entropy(z, t, reduction="none") * tw).sum()
    (grad,) = torch.autograd.grad(expected, z)  # tw * (softmax - onehot): the chains leave tw to the product
    unweighted = grad / tw[:, None]
    eager_total, eager_grad = eager_chain(logits.clone(), torch.empty(6, 40), t, tw)
    fused_total, fused_grad = fused_chain(logits.clone(), t, tw)
    for total, g_out in ((eager_total, eager_grad), (fused_total, fused_grad)):
        assert torch.allclose(total, expected, rtol=1e-5)
        assert g_out.dtype == torch.bfloat16
        assert torch.allclose(g_out.float(), unweighted, atol=4e-3)
