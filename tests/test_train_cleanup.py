"""A library caller whose run stops (NaN loss, Ctrl-C, an exception) gets its model object back as it gave
it: transformers' own norm modules, the attention implementation it had, no workspace buffers held, the
SIGINT handler it had. Failures are injected from the test process (a patched loss function)."""

import signal

import pytest
import torch

from deltatune.config import load_config
from deltatune.errors import TrainingError
from deltatune.testing import tiny_model, tiny_tokenizer
from deltatune.train import loop
from deltatune.train.fused_norms import FusedRMSNorm
from deltatune.train.workspace import _workspaces


def _serve_this_model(monkeypatch, model):
    """The loop loads the tokenizer (to check the data) before the model: both come from here."""
    monkeypatch.setattr(
        "deltatune.models.load_model", lambda name, dtype=None, **kw: (model.to(dtype), tiny_tokenizer())
    )
    monkeypatch.setattr("deltatune.models.load_tokenizer", lambda name, **kw: tiny_tokenizer())
    monkeypatch.setattr("deltatune.models.model_skeleton", lambda name, **kw: None)


class Stop(RuntimeError):
    pass


def _failing_loss(kind: str, at_step: int):
    real = loop.weighted_lm_loss_sum
    calls = {"n": 0}

    def loss(hidden, head, ids, weights, **kwargs):  # chunk, transform: as the loop passes them
        calls["n"] += 1
        s, w = real(hidden, head, ids, weights, **kwargs)
        if calls["n"] >= at_step:
            if kind == "nan":
                return s * float("nan"), w
            raise KeyboardInterrupt if kind == "ctrl-c" else Stop("injected")
        return s, w

    return loss


@pytest.mark.parametrize(
    "kind,expected,norms",
    [("nan", TrainingError, "auto"), ("ctrl-c", KeyboardInterrupt, "off"), ("exception", Stop, "off")],
)
def test_stopped_run_gives_the_model_back_unchanged(monkeypatch, tmp_path, data_file, kind, expected, norms):
    model = tiny_model(0)
    attn = model.config._attn_implementation
    _serve_this_model(monkeypatch, model)
    monkeypatch.setattr(loop, "weighted_lm_loss_sum", _failing_loss(kind, at_step=3))
    handler = signal.getsignal(signal.SIGINT)
    cfg = load_config(
        overrides=dict(
            data=str(data_file),
            output=str(tmp_path / "run"),
            method="lora",
            rank=2,
            batch_size=2,
            seq_len=64,
            precision="fp32",
            steps=6,
            fused_norms=norms,
            attention="packed",
            eval_fraction=0.1,
            warmup_steps=0,
        )
    )
    with pytest.raises(expected):
        loop.train(cfg, quiet=True)
    assert not any(isinstance(m, FusedRMSNorm) for m in model.modules())
    assert model.config._attn_implementation == attn
    assert all(not w.buffers for w in _workspaces)
    assert signal.getsignal(signal.SIGINT) is handler
    with torch.no_grad():  # and it still runs with the standard kernel
        assert torch.isfinite(model(torch.tensor([[1, 5, 9, 33]])).logits).all()


def test_a_finished_run_restores_the_same_way(monkeypatch, tmp_path, data_file):
    model = tiny_model(0)
    _serve_this_model(monkeypatch, model)
    cfg = load_config(
        overrides=dict(
            data=str(data_file),
            output=str(tmp_path / "run"),
            method="lora",
            rank=2,
            batch_size=2,
            seq_len=64,
            precision="fp32",
            steps=2,
            fused_norms="off",
            attention="packed",
            eval_fraction=0.1,
            warmup_steps=0,
        )
    )
    loop.train(cfg, quiet=True)
    assert model.config._attn_implementation == "sdpa" and all(not w.buffers for w in _workspaces)
