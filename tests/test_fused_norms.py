"""The compiled RMSNorm swaps in for transformers' LlamaRMSNorm with equal outputs and gradients,
the same state-dict keys, and a clean way back; without a compiler nothing is swapped."""

import torch

from deltatune.testing import tiny_model
from deltatune.train import fused_norms


def _loss_and_grads(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "norm" in n}


def test_fused_norms_equal_the_originals_and_restore():
    torch.manual_seed(0)
    model = tiny_model()
    with torch.no_grad():  # non-trivial norm weights
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    keys = list(model.state_dict())
    ref_logits, ref_grads = _loss_and_grads(model, ids)
    restore, why_not = fused_norms.install(model)
    assert why_not is None
    swapped = [m for m in model.modules() if isinstance(m, fused_norms.FusedRMSNorm)]
    assert len(swapped) == 2 * model.config.num_hidden_layers + 1  # two per layer and the final norm
    assert list(model.state_dict()) == keys
    logits, grads = _loss_and_grads(model, ids)
    assert torch.allclose(logits, ref_logits, atol=1e-6)
    for name, g in ref_grads.items():
        assert torch.allclose(grads[name], g, atol=1e-6), name
    restore()
    assert not any(isinstance(m, fused_norms.FusedRMSNorm) for m in model.modules())


def test_fused_norm_is_bitwise_equal_in_bf16():
    weight = torch.nn.Parameter(torch.rand(64, dtype=torch.bfloat16) + 0.5)
    x = torch.randn(3, 32, 64, dtype=torch.bfloat16)
    fused = fused_norms.FusedRMSNorm(weight, 1e-5)
    assert torch.equal(fused(x), fused_norms.rms_norm(x, weight, 1e-5))


def test_nothing_is_swapped_when_compiling_fails(monkeypatch):
    model = tiny_model()

    def broken():
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(fused_norms, "_kernel", broken)
    restore, why_not = fused_norms.install(model)
    assert "no C++ compiler" in why_not
    assert not any(isinstance(m, fused_norms.FusedRMSNorm) for m in model.modules())


def test_models_without_llama_norms_are_left_alone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    _, why_not = fused_norms.install(model)
    assert why_not == "no Llama-style RMSNorm in the model"
