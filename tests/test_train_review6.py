"""Review 6 of the training loop: Ctrl-C during the final evaluation keeps the run, ReMoRA's Ctrl-C keeps the
model, `precision: auto` resumes in the precision it trained in, `epochs` counts every epoch's own rows, and
`eval_every` with nothing held out is refused."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from deltatune.errors import ConfigError
from deltatune.testing import tiny_train_config
from deltatune.train import loop
from deltatune.train.checkpoint import list_checkpoints
from deltatune.train.loop import train


def _adapter(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "adapter_model.safetensors"))


def _interrupt_the_final_evaluation(monkeypatch):
    """SIGINT arrives while the held-out loss after the last step is computed."""
    real = loop.evaluate_loss

    def evaluate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate_loss", evaluate)


def test_ctrl_c_during_the_final_evaluation_keeps_the_run_and_resume_finishes_it(
    tiny_dir, data_file, tmp_path, monkeypatch, capsys
):
    """The handlers were restored when the step loop ended: a Ctrl-C in the final evaluation raised at once, with
    no checkpoint (save_every unset) and no final/; the folder could be neither resumed nor retrained."""
    straight = train(tiny_train_config(tiny_dir, data_file, tmp_path / "straight", steps=4), quiet=True)
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        _interrupt_the_final_evaluation(patch)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_train_config(tiny_dir, data_file, run, steps=4))
    assert "interrupted during the final evaluation at step 4; checkpoint saved" in capsys.readouterr().out
    assert [c.name for c in list_checkpoints(run)] == ["step-0000004"] and not (run / "final").exists()
    resumed = train(tiny_train_config(tiny_dir, data_file, run, steps=4, resume=True), quiet=True)
    a, b = _adapter(tmp_path / "straight"), _adapter(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.final_loss == straight.final_loss  # it was NaN: no step ran in the resuming process
    assert resumed.eval_loss == straight.eval_loss


def test_remora_ctrl_c_saves_the_model_trained_so_far(tiny_dir, data_file, tmp_path, capsys):
    """ReMoRA cannot resume (it merges into the base weights): its Ctrl-C wrote a checkpoint that resume refuses
    and said "continue with --resume", leaving no model at all."""
    options = {"remora_every": 2, "remora_types": 4}

    def interrupt_at_3(step, total, model):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = tiny_train_config(tiny_dir, data_file, tmp_path / "run", method="mora", steps=6, method_options=options)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=interrupt_at_3)
    out = capsys.readouterr().out
    assert "interrupted at step 3; method 'mora' cannot resume" in out and "--resume" not in out
    assert (tmp_path / "run" / "final" / "config.json").exists() and not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(ConfigError) as err:
        train(
            tiny_train_config(tiny_dir, data_file, tmp_path / "b", method="mora", save_every=2, method_options=options)
        )
    assert err.value.field == "save_every" and not (tmp_path / "b").exists()


def test_precision_auto_resumes_in_the_precision_the_run_trained_in(tiny_dir, data_file, tmp_path, monkeypatch):
    """auto was decided again on resume: on a CPU without bf16 (or cuda after cpu) a bf16 run went on in fp32."""
    monkeypatch.setattr(loop, "_cpu_has_bf16", lambda: True)
    cfg = dict(steps=4, precision="auto")
    train(tiny_train_config(tiny_dir, data_file, tmp_path / "straight", **cfg), quiet=True)

    def interrupt_at_2(step, total, model):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(tiny_train_config(tiny_dir, data_file, tmp_path / "run", **cfg), quiet=True, on_step=interrupt_at_2)
    monkeypatch.setattr(loop, "_cpu_has_bf16", lambda: False)  # where auto would now pick fp32
    assert (
        loop.pick_precision(tiny_train_config(tiny_dir, data_file, tmp_path / "x", **cfg), torch.device("cpu"))
        == "fp32"
    )
    train(tiny_train_config(tiny_dir, data_file, tmp_path / "run", resume=True, **cfg), quiet=True)
    a, b = _adapter(tmp_path / "straight"), _adapter(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_epochs_count_the_micro_batches_of_each_epoch(tiny_dir, data_file, tmp_path):
    """Every epoch is packed after its own shuffle: epoch 0's count times `epochs` stopped a 2-epoch run short of
    its second pass, or ran on into a third."""
    from deltatune.data.segments import Role, TokenizedExample

    examples = [
        TokenizedExample(list(range(3, 3 + n)), [Role.RESPONSE] * n, [0] * n)
        for n in [5 + (i * 37) % 50 for i in range(60)]
    ]
    cfg = tiny_train_config(tiny_dir, data_file, tmp_path, batch_size=1, seq_len=64)
    data = loop.MicroBatches(examples, cfg)
    counts = [len(data.epoch_batches(e)) for e in range(3)]
    assert len(set(counts)) > 1  # the packings differ, or this test could not fail
    assert data.in_epochs(2) == counts[0] + counts[1]
    assert data.in_epochs(2.5) == counts[0] + counts[1] + 0.5 * counts[2]
    assert data.in_epochs(0.5) == 0.5 * counts[0]
    assert loop.epoch_steps(data.in_epochs(2), 2) == -(-(counts[0] + counts[1]) // 2)
    assert data.epoch_batches(0) is data.epoch_batches(0)  # training starts from the cached epoch 0


@pytest.mark.parametrize("held_out", [dict(eval_fraction=0.0), dict(eval_fraction=0.02)])
def test_eval_every_with_nothing_held_out_is_refused_before_the_model_loads(tiny_dir, data_file, tmp_path, held_out):
    """It evaluated nothing and wrote no eval_loss and no best/, without a word."""
    with pytest.raises(ConfigError) as err:
        train(tiny_train_config(tiny_dir, data_file, tmp_path / "run", eval_every=2, **held_out), quiet=True)
    assert err.value.field == "eval_every" and "holds none" in str(err.value)
    assert not (tmp_path / "run").exists()


def test_betas_under_lomo_are_said_to_be_unused(tiny_dir, data_file, tmp_path, capsys):
    """LOMO is SGD without moments: betas given with it were accepted and ignored, silently."""
    cfg = dict(method="full", fused_update="lomo", steps=1, lr=1e-3)
    train(tiny_train_config(tiny_dir, data_file, tmp_path / "a", betas=(0.8, 0.9), **cfg), quiet=True)
    assert "warning: betas are not used by fused_update lomo" in capsys.readouterr().err
    train(tiny_train_config(tiny_dir, data_file, tmp_path / "b", **cfg), quiet=True)
    assert "betas" not in capsys.readouterr().err


def test_a_resume_keeps_a_best_written_after_its_checkpoint_unless_beaten(tiny_dir, data_file, tmp_path, capsys):
    """best/ written at a step after the checkpoint (the crash came later) was replaced by the resumed run's first
    eval that beat the checkpoint's best, even when it was worse than what best/ held (after a changed schedule
    the resumed steps train another way). The resume now knows best/'s eval loss from metrics.jsonl."""
    run = tmp_path / "run"

    def crash_at_4(step, total, model):  # step 3 is logged, the checkpoint is step 2's
        if step == 4:
            raise RuntimeError("power cut")

    cfg = dict(steps=5, save_every=2, eval_every=1)
    with pytest.raises(RuntimeError, match="power cut"):
        train(tiny_train_config(tiny_dir, data_file, run, **cfg), quiet=True, on_step=crash_at_4)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    metrics[2]["eval_loss"] = 1e-3  # best/ as written at step 3: far better than anything the resume will see
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (run / "best" / "marker").write_text("step 3")
    train(tiny_train_config(tiny_dir, data_file, run, resume=True, **{**cfg, "steps": 7}))
    assert (run / "best" / "marker").read_text() == "step 3"
    assert "best/ holds step 3 of the run before this resume (eval loss 0.0010)" in capsys.readouterr().out


def test_a_resume_removes_what_a_killed_write_left_and_nothing_else(tiny_dir, data_file, tmp_path):
    """A kill during a checkpoint write left `checkpoints/.step-N.tmp.XXXXXXXX` (as large as the model and its
    optimizer state) for good: neither resume nor pruning removed it. A previous best/ that a kill caught between
    the two renames of its swap is put back. The user's own hidden files stay."""
    run = tmp_path / "run"
    cfg = dict(steps=2, save_every=2, eval_every=1)
    train(tiny_train_config(tiny_dir, data_file, run, **cfg), quiet=True)
    half = run / "checkpoints" / ".step-0000004.tmp.k2j_9xqz"
    half.mkdir()
    (half / "state.pt").write_bytes(b"x" * 1000)
    (run / ".config.yaml.original").write_text("mine")  # the pattern of write_text_atomic's small temporaries: kept
    (run / "best").rename(run / "kept-best")
    (run / ".best.old.q8w7e6r5").mkdir()
    (run / "kept-best").rename(run / ".best.old.q8w7e6r5" / "x")  # killed between the swap's two renames
    (run / ".notes.txt").write_text("mine")
    (run / ".mydata.abcdefgh").write_text("mine too")  # not a name deltatune writes
    train(tiny_train_config(tiny_dir, data_file, run, resume=True, **{**cfg, "steps": 3}), quiet=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]
    hidden = sorted(p.name for p in run.iterdir() if p.name.startswith("."))
    assert hidden == [".config.yaml.original", ".mydata.abcdefgh", ".notes.txt"]
    assert (run / "best" / "adapter_model.safetensors").exists()
