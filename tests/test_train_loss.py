import pytest
import torch

from deltatune.testing import tiny_model
from deltatune.train.loss import reference_lm_loss_sum, weighted_lm_loss_sum


def _batch(seed=0, b=2, t=12, vocab=512):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    w = (torch.rand(b, t, generator=g) > 0.4).float() * torch.rand(b, t, generator=g)
    w[:, 0] = 0
    return ids, w


@pytest.mark.parametrize("chunk", [5, 1024])  # several chunks (the head's gradient summed), and one (assigned)
def test_chunked_loss_and_grads_match_full_logits_float64(chunk):
    model = tiny_model().double()
    model.train()
    ids, w = _batch()
    # reference: full logits, autograd
    ref_sum, ref_w = reference_lm_loss_sum(model(ids).logits, ids, w)
    ref_sum.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hidden = model.model(input_ids=ids).last_hidden_state
    ours, ours_w = weighted_lm_loss_sum(hidden, model.lm_head, ids, w, chunk=chunk)
    ours.backward()
    assert torch.allclose(ours, ref_sum, atol=1e-10)
    assert torch.allclose(ours_w, ref_w)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref_grads[n], atol=1e-10), n


def test_zero_weight_positions_never_reach_the_head():
    model = tiny_model()
    ids, w = _batch()
    w.zero_()
    w[0, 5] = 2.0
    hidden = model.model(input_ids=ids).last_hidden_state
    ours, total_w = weighted_lm_loss_sum(hidden, model.lm_head, ids, w)
    logits = model(ids).logits[0, 4].log_softmax(-1)
    assert torch.allclose(ours, -2.0 * logits[ids[0, 5]], atol=1e-5)
    assert total_w.item() == 2.0


def test_targets_far_below_the_best_logit_keep_an_exact_finite_loss_in_float32():
    # a target 200 nats below the best logit: its probability underflows float32 (exp(-200) = 0),
    # yet the loss (lse - logit) and the gradient stay exact
    vocab, width = 50, 8
    head = torch.nn.Linear(width, vocab, bias=False)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[0, 0] = 100.0  # token 0: logit +100
        head.weight[1, 0] = -100.0  # token 1: logit -100
    hidden = torch.zeros(1, 3, width)
    hidden[0, :, 0] = 1.0
    hidden.requires_grad_()
    ids = torch.tensor([[0, 1, 0]])
    weights = torch.tensor([[0.0, 1.0, 0.5]])
    total, weight = weighted_lm_loss_sum(hidden, head, ids, weights, compute_dtype=torch.float32)
    total.backward()
    logits = hidden.detach().double() @ head.weight.double().T
    ref, ref_weight = reference_lm_loss_sum(logits, ids, weights)
    assert torch.isfinite(total) and abs(total.item() - ref.item()) < 1e-3 * ref.item()
    assert ref.item() > 199 and weight.item() == ref_weight.item() == 1.5
    assert torch.isfinite(hidden.grad).all()
