"""Review regressions for the fused updates (LOMO, fused AdamW) and the fused RMSNorm."""

import copy

import torch

from deltatune.testing import tiny_model
from deltatune.train import fused_norms
from deltatune.train.lomo import FusedUpdate, build_fused
from deltatune.train.optim import decay_groups

IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 11, 40], [1, 7, 8, 100, 200, 300, 2, 2]])


def _loss(model):
    return model(IDS, labels=IDS).loss


def _pair64():
    model = tiny_model(0).double()
    model.train()
    return model, copy.deepcopy(model)


def _max_diff(a, b) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def test_lomo_global_clipping_on_float64_weights_equals_sgd_after_clip_grad_norm():
    model, ref_model = _pair64()
    lomo = build_fused("lomo", model.parameters(), lr=0.5, weight_decay=0.1, max_norm=0.05)
    # no decay on biases and vectors, as every optimizer here (review 7: LOMO decayed them)
    ref = torch.optim.SGD(decay_groups(list(ref_model.parameters()), 0.1), lr=0.5, weight_decay=0.1)
    for _ in range(3):
        assert lomo.backward(_loss(model))
        _loss(ref_model).backward()
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.05)
        ref.step()
        ref.zero_grad()
    assert _max_diff(model, ref_model) < 1e-12


def test_fused_adamw_per_tensor_clipping_keeps_float64_precision():
    model, ref_model = _pair64()
    fused = build_fused("fused-adamw", model.parameters(), lr=1e-2, weight_decay=0.1, max_norm=0.01)
    ref = torch.optim.AdamW(decay_groups(list(ref_model.parameters()), 0.1), lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(3):
        fused.backward(_loss(model))
        _loss(ref_model).backward()
        for p in ref_model.parameters():
            torch.nn.utils.clip_grad_norm_([p], 0.01)
        ref.step()
        ref.zero_grad()
    assert _max_diff(model, ref_model) < 1e-12


def test_static_loss_scale_keeps_float64_gradients_exact():
    model, ref_model = _pair64()
    scaled = FusedUpdate(model.parameters(), lr=0.5, loss_scale=1024.0)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.5)
    assert scaled.backward(_loss(model))
    _loss(ref_model).backward()
    ref.step()
    assert _max_diff(model, ref_model) < 1e-12


def test_fused_norm_formula_check_does_not_fill_a_device_tensor_from_a_cpu_generator(monkeypatch):
    # CUDA refuses a CPU generator for a CUDA tensor ("Expected a 'cuda' device type for generator");
    # emulate that rule on this CPU-only machine by asking for the draw's device explicitly.
    real_randn = torch.randn

    def strict_randn(*shape, generator=None, device=None, **kw):
        if generator is not None and device is not None:
            raise RuntimeError(f"Expected a '{torch.device(device).type}' device type for generator")
        return real_randn(*shape, generator=generator, device=device, **kw)

    monkeypatch.setattr(torch, "randn", strict_randn)
    model = tiny_model()
    assert fused_norms._same_formula(model.model.norm)


def test_step_after_a_plain_backward_clips_globally_like_clip_grad_norm():
    model, ref_model = _pair64()
    lomo = build_fused("lomo", model.parameters(), lr=0.5, max_norm=0.05)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.5)
    _loss(model).backward()  # outside the hooks: step() applies the update to the held gradients
    lomo.step()
    _loss(ref_model).backward()
    torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.05)
    ref.step()
    assert _max_diff(model, ref_model) < 1e-12


def test_step_after_a_plain_backward_does_not_unscale_unscaled_gradients():
    model, ref_model = _pair64()
    lomo = FusedUpdate(model.parameters(), lr=0.5, loss_scale="dynamic")  # as build_fused makes for fp16
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.5)
    _loss(model).backward()  # a plain backward: the loss was not multiplied by the scale
    lomo.step()
    _loss(ref_model).backward()
    ref.step()
    assert _max_diff(model, ref_model) < 1e-12


def test_the_loss_scale_survives_a_state_dict_round_trip(tmp_path):
    """A resumed fp16 LOMO run went on at 2^16 whatever scale it had reached; the scale, its clean-step count and
    the skipped steps now travel in the optimizer's state (through torch.save and weights_only loading)."""
    import torch

    from deltatune.train.lomo import build_fused

    w = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.float16))
    opt = build_fused("lomo", [w], lr=0.1)
    assert opt.dynamic_scale and opt.scale == 2.0**16
    opt.scale, opt._good_steps, opt.skipped_steps = 1024.0, 7, 2
    torch.save(opt.state_dict(), tmp_path / "state.pt")
    fresh = build_fused("lomo", [w], lr=0.1)
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert (fresh.scale, fresh._good_steps, fresh.skipped_steps) == (1024.0, 7, 2)
    older = dict(opt.state_dict())
    older.pop("loss_scaling")
    build_fused("lomo", [w], lr=0.1).load_state_dict(older)  # a checkpoint from before still loads
