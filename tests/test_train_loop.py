"""The training loop end to end on a tiny model: learning, exact resume after SIGKILL, Ctrl-C, NaN stop."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltatune.config import load_config
from deltatune.errors import ConfigError, TrainingError
from deltatune.testing import tiny_train_config
from deltatune.train.loop import train

REPO = Path(__file__).resolve().parent.parent


_cfg = tiny_train_config  # (tiny_dir, data_file, out, **overrides)


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    from deltatune.train.checkpoint import WEIGHTS_FILE, list_checkpoints

    return load_file(str(list_checkpoints(run)[-1] / WEIGHTS_FILE))


def test_lora_run_lowers_loss_and_saves_peft_adapter(tiny_dir, data_file, tmp_path):
    result = train(_cfg(tiny_dir, data_file, tmp_path / "run", steps=30, eval_every=10, lr=1e-2), quiet=True)
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5  # tiny random model: LoRA learns slowly
    assert (tmp_path / "run" / "final" / "adapter_config.json").exists()
    assert (tmp_path / "run" / "config.yaml").exists()
    metrics = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 31))
    assert any("eval_loss" in m for m in metrics)


def test_existing_run_needs_resume(tiny_dir, data_file, tmp_path):
    train(_cfg(tiny_dir, data_file, tmp_path / "run", steps=2, save_every=1), quiet=True)
    with pytest.raises(ConfigError, match="--resume"):
        train(_cfg(tiny_dir, data_file, tmp_path / "run", steps=2, save_every=1), quiet=True)


def _launch(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "deltatune", "train", *args, "--quiet"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_checkpoint(run: Path, proc: subprocess.Popen, min_step: int, timeout: float = 120) -> None:
    """Until a complete checkpoint at step >= min_step exists (older ones are pruned, so any will do)."""
    from deltatune.train.checkpoint import list_checkpoints

    deadline = time.time() + timeout
    while not any(int(c.name.split("-")[1]) >= min_step for c in list_checkpoints(run)):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out waiting for a checkpoint"
        time.sleep(0.02)


def _cli_args(tiny_dir, data_file, out, steps):
    return [
        "--model",
        str(tiny_dir),
        "--data",
        str(data_file),
        "--output",
        str(out),
        "--method",
        "lora",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--lr",
        "5e-3",
        "--batch-size",
        "2",
        "--seq-len",
        "64",
        "--precision",
        "fp32",
        "--steps",
        str(steps),
        "--seed",
        "3",
        "--save-every",
        "1",
        "--set",
        "eval_fraction=0.1",
        "--set",
        "warmup_steps=0",
        "--threads",
        "1",
    ]


def test_sigkill_then_resume_equals_uninterrupted_run_bitwise(tiny_dir, data_file, tmp_path):
    torch.set_num_threads(1)
    # earlier tests compiled the fused RMSNorm for many dtypes and grad modes in this process; past
    # dynamo's recompile limit it runs eagerly, which rounds differently from the compiled kernel that
    # the killed run (a fresh process) uses. Start from empty caches, as every real run does.
    torch._dynamo.reset()
    steps = 60
    straight = tmp_path / "straight"
    train(
        load_config(
            overrides={
                **_cfg(tiny_dir, data_file, straight).model_dump(),
                "steps": steps,
                "batch_size": 2,
                "save_every": 1,
                "num_threads": 1,
            }
        ),
        quiet=True,
    )
    killed = tmp_path / "killed"
    proc = _launch(_cli_args(tiny_dir, data_file, killed, steps))
    _wait_for_checkpoint(killed, proc, min_step=3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from deltatune.train.checkpoint import list_checkpoints

    assert int(list_checkpoints(killed)[-1].name.split("-")[1]) < steps  # it really stopped mid-run
    resumed = train(
        load_config(
            overrides={
                **_cfg(tiny_dir, data_file, killed).model_dump(),
                "steps": steps,
                "batch_size": 2,
                "save_every": 1,
                "num_threads": 1,
                "resume": True,
            }
        ),
        quiet=True,
    )
    assert resumed.steps == steps
    a, b = _final_weights(straight), _final_weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tiny_dir, data_file, tmp_path, sig):
    """Ctrl-C, and SIGTERM (Slurm preemption, docker stop; it killed the run with no checkpoint), finish the step,
    save a checkpoint and stop."""
    out = tmp_path / "run"
    proc = _launch(_cli_args(tiny_dir, data_file, out, 100000))
    _wait_for_checkpoint(out, proc, min_step=2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    from deltatune.train.checkpoint import list_checkpoints

    assert int(list_checkpoints(out)[-1].name.split("-")[1]) >= 2


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_dir, data_file, tmp_path):
    cfg = _cfg(tiny_dir, data_file, tmp_path / "run", steps=50, lr=1e30, save_every=1, max_grad_norm=None)
    with pytest.raises(TrainingError, match="loss became"):
        train(cfg, quiet=True)
    from deltatune.train.checkpoint import list_checkpoints

    for ckpt in list_checkpoints(tmp_path / "run"):
        assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "trainable.safetensors")).values())


def test_cli_reports_a_bad_key_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "deltatune", "train", "--set", "lrr=1"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "did you mean 'lr'" in proc.stderr


def test_per_example_attention_trains_like_the_block_diagonal_mask(tiny_dir, data_file, tmp_path):
    runs = {}
    for attention in ("mask", "packed"):
        out = tmp_path / attention
        train(_cfg(tiny_dir, data_file, out, steps=4, save_every=4, attention=attention, pack_len=128), quiet=True)
        runs[attention] = _final_weights(out)
    for name, value in runs["mask"].items():
        assert torch.allclose(runs["packed"][name], value, atol=1e-5), name


def test_attention_auto_resolves_to_packed_on_cpu_and_mask_where_it_cannot(tiny_dir, data_file, tmp_path):
    from deltatune.testing import tiny_model
    from deltatune.train.loop import use_packed_attention

    model, cpu = tiny_model(), torch.device("cpu")
    cfg = lambda **kw: _cfg(tiny_dir, data_file, tmp_path, **kw)  # noqa: E731
    assert use_packed_attention(cfg(), model, cpu)
    assert not use_packed_attention(cfg(attention="mask"), model, cpu)
    assert not use_packed_attention(cfg(packing=False), model, cpu)
    assert not use_packed_attention(cfg(), model, torch.device("cuda"))  # SDPA's fused kernels there
    assert use_packed_attention(cfg(attention="packed"), model, torch.device("cuda"))
    assert not use_packed_attention(cfg(method="prompt"), model, cpu)  # virtual tokens: the mask path
    with pytest.raises(ConfigError, match="method\\(s\\) prompt add virtual positions"):
        use_packed_attention(cfg(method="prompt", attention="packed"), model, cpu)
    model.config.attention_dropout = 0.1
    assert not use_packed_attention(cfg(), model, cpu)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_full_finetuning_under_bf16_autocast_trains_with_packed_attention(
    tiny_dir, data_file, tmp_path, monkeypatch, capsys, native_bf16
):
    # float32 weights under bf16 autocast: rotary embeddings hand the attention float32 q/k and bf16 v
    from deltatune.train import loop

    monkeypatch.setattr(loop, "_cpu_has_bf16", lambda: native_bf16)
    result = train(
        _cfg(tiny_dir, data_file, tmp_path / "run", method="full", precision="bf16", lr=1e-4, steps=2), quiet=True
    )
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    # asked for bf16 where the CPU emulates it: trained as asked, with one warning line saying why it is slow
    assert capsys.readouterr().err.count(loop.EMULATED_BF16_WARNING) == (0 if native_bf16 else 1)


def test_gradient_checkpointing_with_packed_attention_trains_identically(tiny_dir, data_file, tmp_path):
    # the recomputed forward shares the attention's scratch buffers with the backward in flight
    runs = {}
    for ckpt in (False, True):
        out = tmp_path / f"ckpt{ckpt}"
        train(
            _cfg(tiny_dir, data_file, out, steps=3, save_every=3, attention="packed", gradient_checkpointing=ckpt),
            quiet=True,
        )
        runs[ckpt] = _final_weights(out)
    for name, value in runs[False].items():
        assert torch.allclose(runs[True][name], value, atol=1e-6), name


def test_full_finetuning_in_bf16_runs_the_head_in_bf16_as_every_other_linear(
    tiny_dir, data_file, tmp_path, monkeypatch
):
    """The loss runs outside autocast; with fp32 master weights the final hidden state is fp32, so the head's
    three vocabulary-sized products ran in fp32 (2-3x slower on the default model) while every other linear ran
    in bf16, and the lean loop's head (under autocast) too. fp32 runs keep an fp32 head."""
    from deltatune.train import loop

    seen = []

    def spy(hidden, head, *args, **kwargs):
        seen.append((hidden.dtype, head.weight.dtype, kwargs.get("compute_dtype")))
        return weighted(hidden, head, *args, **kwargs)

    weighted = loop.weighted_lm_loss_sum
    monkeypatch.setattr(loop, "weighted_lm_loss_sum", spy)
    cfg = dict(method="full", lr=1e-4, steps=2, eval_every=1)
    train(_cfg(tiny_dir, data_file, tmp_path / "bf16", precision="bf16", **cfg), quiet=True)
    assert seen and set(seen) == {(torch.float32, torch.float32, torch.bfloat16)}  # training and held-out evals
    seen.clear()
    train(_cfg(tiny_dir, data_file, tmp_path / "fp32", precision="fp32", **cfg), quiet=True)
    assert seen and set(seen) == {(torch.float32, torch.float32, None)}
