"""LOMO-style fused update: same weights as a normal optimizer step, far fewer live gradients."""

import copy
import io

import pytest
import torch

from deltatune.errors import ConfigError
from deltatune.testing import tiny_model
from deltatune.train.lomo import FusedUpdate

IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 11, 40], [1, 7, 8, 100, 200, 300, 2, 2]])


def loss_of(model, ids=IDS):
    return model(ids, labels=ids).loss


def pair():
    model = tiny_model(0)
    model.train()
    return model, copy.deepcopy(model)


def assert_same_weights(a, b, atol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_sgd_fused_step_equals_torch_sgd_bitwise(wd):
    fused_model, ref_model = pair()
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.5, weight_decay=wd)
    fused = FusedUpdate(fused_model.parameters(), lr=0.5, weight_decay=wd)
    for _ in range(2):
        loss_of(ref_model).backward()
        ref.step()
        ref.zero_grad()
        with fused.step_hooks_enabled():
            loss_of(fused_model).backward()
        fused.step()
    assert all(p.grad is None for p in fused_model.parameters())
    assert_same_weights(fused_model, ref_model, atol=0)
    assert not torch.equal(fused_model.lm_head.weight, tiny_model(0).lm_head.weight)


def test_adamw_fused_steps_equal_torch_adamw():
    fused_model, ref_model = pair()
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.05, foreach=False)
    fused = FusedUpdate(fused_model.parameters(), lr=1e-2, weight_decay=0.05, algorithm="adamw")
    for _ in range(3):
        loss_of(ref_model).backward()
        ref.step()
        ref.zero_grad()
        with fused.step_hooks_enabled():
            loss_of(fused_model).backward()
    assert_same_weights(fused_model, ref_model, atol=1e-7)


def test_global_clipping_two_passes_equals_clip_grad_norm():
    fused_model, ref_model = pair()
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.5)
    loss_of(ref_model).backward()
    norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), max_norm=0.1)
    assert norm > 0.1  # clipping really happens
    ref.step()
    fused = FusedUpdate(fused_model.parameters(), lr=0.5, clip="global", max_norm=0.1)
    loss = loss_of(fused_model)
    with fused.grad_norm_pass():
        loss.backward(retain_graph=True)
    assert fused.last_grad_norm == pytest.approx(float(norm), rel=1e-6)
    with fused.step_hooks_enabled():
        loss.backward()
    assert_same_weights(fused_model, ref_model, atol=1e-7)


def test_per_param_clipping_clips_each_gradient_to_max_norm():
    model = tiny_model(0)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    fused = FusedUpdate(model.parameters(), lr=1.0, clip="per_param", max_norm=1e-3)
    with fused.step_hooks_enabled():
        loss_of(model).backward()
    for n, p in model.named_parameters():  # with lr 1 the step IS the clipped gradient
        assert float((p.detach() - start[n]).norm()) <= 1e-3 * (1 + 1e-4), n


def _peak_live_grad_bytes(model, run) -> int:
    """Observe, at every gradient accumulation, the bytes of all gradients alive in the model."""
    params = list(model.parameters())
    peak = [0]

    def observe(_):
        peak[0] = max(peak[0], sum(p.grad.nbytes for p in params if p.grad is not None))

    handles = [p.register_post_accumulate_grad_hook(observe) for p in params]  # runs before the fused hook
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return peak[0]


def test_full_set_of_gradients_never_exists_at_once():
    plain_model, fused_model = pair()
    plain = _peak_live_grad_bytes(plain_model, lambda: loss_of(plain_model).backward())
    fused = FusedUpdate(fused_model.parameters(), lr=1e-3)

    def fused_backward():
        with fused.step_hooks_enabled():
            loss_of(fused_model).backward()

    peak = _peak_live_grad_bytes(fused_model, fused_backward)
    total = sum(p.nbytes for p in fused_model.parameters())
    largest = max(p.nbytes for p in fused_model.parameters())
    assert plain == total
    assert peak == largest < total / 3


def test_state_dict_resumes_exactly_and_lr_follows_a_scheduler():
    a_model, b_model = pair()
    a = FusedUpdate(a_model.parameters(), lr=1e-2, algorithm="adamw")
    sched = torch.optim.lr_scheduler.LambdaLR(a, lambda step: 0.5**step)
    for _ in range(2):
        with a.step_hooks_enabled():
            loss_of(a_model).backward()
        a.step()
        sched.step()
    assert a.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)
    b_model.load_state_dict(a_model.state_dict())
    b = FusedUpdate(b_model.parameters(), lr=123.0, algorithm="adamw")
    buffer = io.BytesIO()  # through bytes, as a checkpoint does (a loaded state_dict otherwise aliases a's tensors)
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert b.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)
    for opt, model in ((a, a_model), (b, b_model)):
        with opt.step_hooks_enabled():
            loss_of(model).backward()
    assert_same_weights(a_model, b_model, atol=0)


def test_step_outside_the_hooks_is_the_same_update():
    fused_model, ref_model = pair()
    ref = FusedUpdate(ref_model.parameters(), lr=1e-2, algorithm="adamw")
    fused = FusedUpdate(fused_model.parameters(), lr=1e-2, algorithm="adamw")
    loss_of(ref_model).backward()
    ref.step()
    with fused.step_hooks_enabled():
        loss_of(fused_model).backward()
    assert_same_weights(fused_model, ref_model, atol=0)


def test_bad_settings_are_config_errors():
    params = tiny_model(0).parameters()
    with pytest.raises(ConfigError, match="algorithm"):
        FusedUpdate(params, lr=1e-3, algorithm="lion")
    with pytest.raises(ConfigError, match="max_norm"):
        FusedUpdate(tiny_model(0).parameters(), lr=1e-3, clip="global")
    fused = FusedUpdate(tiny_model(0).parameters(), lr=1e-3, clip="global", max_norm=1.0)
    with pytest.raises(ConfigError, match="grad_norm_pass"):
        with fused.step_hooks_enabled():
            pass


# --- real LOMO: build_fused("lomo"), the two-pass backward, loss scaling -----------------------------
from deltatune.train.lomo import build_fused  # noqa: E402


def test_lomo_is_sgd_without_state_and_clips_the_global_norm_like_clip_grad_norm():
    lomo_model, ref_model = pair()
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.5)
    lomo = build_fused("lomo", lomo_model.parameters(), lr=0.5, max_norm=0.1)
    for _ in range(2):
        loss_of(ref_model).backward()
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), max_norm=0.1)
        ref.step()
        ref.zero_grad()
        assert lomo.backward(loss_of(lomo_model))  # two passes: norm, then clipped update
        lomo.step()
    assert_same_weights(lomo_model, ref_model, atol=1e-7)
    assert not lomo.state  # no optimizer state at all
    assert all(p.grad is None for p in lomo_model.parameters())


def test_fused_adamw_keeps_its_name_and_state():
    model = tiny_model(0)
    opt = build_fused("fused-adamw", model.parameters(), lr=1e-3, max_norm=1.0)
    assert opt.algorithm == "adamw" and opt.clip == "per_param"
    opt.backward(loss_of(model))
    assert len(opt.state) == len(list(model.parameters()))  # exp_avg and exp_avg_sq per weight
    with pytest.raises(ConfigError, match="lomo, fused-adamw"):
        build_fused("adalomo", model.parameters(), lr=1e-3)


def test_lomo_on_fp16_weights_scales_the_loss_and_skips_an_overflowing_step():
    model = tiny_model(0).half()
    model.train()
    ref = copy.deepcopy(model).float()
    lomo = build_fused("lomo", model.parameters(), lr=0.5, max_norm=None)
    assert lomo.dynamic_scale and lomo.scale == 2.0**16
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    big = torch.tensor(1e6, dtype=torch.float16)  # loss x 2^16 overflows fp16 gradients: the step is skipped
    assert not lomo.backward(loss_of(model) * big)
    assert lomo.scale == 2.0**15 and lomo.skipped_steps == 1
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())
    lomo.scale = 8.0  # a scale with finite gradients: the update equals unscaled SGD up to fp16 rounding
    assert lomo.backward(loss_of(model))
    torch.optim.SGD(ref.parameters(), lr=0.5).zero_grad()
    loss_of(ref).backward()
    with torch.no_grad():
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.float(), (q - 0.5 * q.grad).half().float(), rtol=0, atol=2e-3, msg=n)
