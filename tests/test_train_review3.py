"""Review of the training loop (third pass): resume with a changed length, epochs with accumulation, and
configuration errors that name the right place. Each test failed before its fix."""

from __future__ import annotations

import pytest
from reliability_helpers import read_metrics

from deltatune.config import load_config
from deltatune.errors import ConfigError
from deltatune.testing import tiny_train_config
from deltatune.train.loop import train
from deltatune.train.optim import lr_factor

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one thread is fastest (conftest.py)


def test_a_resume_with_more_steps_runs_the_new_schedule_from_its_first_step(tiny_dir, data_file, tmp_path):
    """`steps 3 -> 6` on resume: the first resumed step ran at the rate the old 3-step cosine had saved in the
    optimizer for its (non-existent) step 4, 0.0, instead of the 6-step schedule's lr/2; later steps were right."""
    lr, run = 5e-3, tmp_path / "run"
    train(tiny_train_config(tiny_dir, data_file, run, steps=3, save_every=1, lr=lr), quiet=True)
    train(tiny_train_config(tiny_dir, data_file, run, steps=6, save_every=1, lr=lr, resume=True), quiet=True)
    logged = [m["lr"] for m in read_metrics(run)]
    want = [lr * lr_factor(s, 3, 0, "cosine") for s in range(3)] + [
        lr * lr_factor(s, 6, 0, "cosine") for s in (3, 4, 5)
    ]
    assert logged == pytest.approx(want, rel=1e-12)


def test_a_resume_with_fewer_steps_than_the_checkpoint_is_refused(tiny_dir, data_file, tmp_path):
    """A checkpoint at step 4 resumed with `steps: 2` trained nothing, replaced final/ with the 4-step weights
    and recorded `steps: 2` in config.yaml (which promises to describe what was trained)."""
    run = tmp_path / "run"
    train(tiny_train_config(tiny_dir, data_file, run, steps=4, save_every=2), quiet=True)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    with pytest.raises(ConfigError, match=r"steps.*step 4"):
        train(tiny_train_config(tiny_dir, data_file, run, steps=2, save_every=2, resume=True), quiet=True)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing written


def test_epochs_count_micro_batches_not_whole_accumulated_steps_per_epoch(tiny_dir, data_file, tmp_path, monkeypatch):
    """`epochs: 3` with 9 micro-batches an epoch and grad_accum 8 trained 6 steps (48 micro-batches, 5.3 epochs):
    the steps were ceil(9 / 8) = 2 per epoch, times 3. Now ceil(3 x 9 / 8) = 4 steps: 32 micro-batches, the
    3 epochs asked for and less than one accumulated step more."""
    from deltatune.train import loop

    taken: list[tuple[int, int]] = []
    take = loop.MicroBatches.take

    def spy(self, pos, n):
        out = take(self, pos, n)
        taken.append((pos.epoch, pos.micro))
        return out

    monkeypatch.setattr(loop.MicroBatches, "take", spy)
    cfg = tiny_train_config(
        tiny_dir, data_file, tmp_path / "run", steps=None, epochs=3, grad_accum=8, packing=False, batch_size=4
    )  # 36 records, 3 held out: 33 examples, 9 micro-batches of 4
    result = train(cfg, quiet=True)
    assert result.steps == 4
    assert len(taken) == 32 and taken[26] == (2, 9)  # the 27th micro-batch ends epoch 2
    assert max(epoch for epoch, _ in taken) == 3


@pytest.mark.parametrize(
    "overrides, key",
    [({"rank": 0}, "rank"), ({"lrr": 1.0}, "lrr"), ({"precision": "fp16"}, "precision")],
)
def test_a_bad_value_from_the_command_line_is_not_blamed_on_the_config_file(tmp_path, overrides, key):
    """`deltatune train c.yaml --rank 0`, with `rank: 4` in c.yaml, said `c.yaml: field 'rank': ...`: the user
    was sent to look for a value their file does not hold."""
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nrank: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert str(path) not in str(err.value) and "command line" in str(err.value) and key in str(err.value)


def test_a_bad_value_in_the_config_file_still_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nrank: 0\n")
    with pytest.raises(ConfigError, match=f"{path}: field 'rank'"):
        load_config(path, {"lr": 1e-4})


def test_a_key_given_twice_in_a_config_file_is_one_line_naming_it(tmp_path):
    """YAML took the last of two `lr:` lines without a word: the first setting was silently ignored."""
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nrank: 4\nlr: 5e-2\n")
    with pytest.raises(ConfigError, match=rf"{path}:3: .*'lr' appears twice"):
        load_config(path)


def test_a_resume_removes_the_snapshots_of_the_steps_it_trains_again(tiny_dir, data_file, tmp_path):
    """Killed after step 9 (snapshots 3, 6, 9; checkpoint 5), resumed with `steps 10 -> 20, snapshot_every
    3 -> 4`: snapshots 6 and 9 of the abandoned 10-step schedule stayed beside the resumed run's 8, 12, ...,
    and `analyze` read them as this run's (snapshot 9 differed from the resumed run's weights by 0.0096)."""
    import shutil

    run = tmp_path / "run"
    train(tiny_train_config(tiny_dir, data_file, run, steps=10, save_every=5, snapshot_every=3), quiet=True)
    shutil.rmtree(run / "checkpoints" / "step-0000010")  # as if killed before step 10's checkpoint
    cfg = tiny_train_config(tiny_dir, data_file, run, steps=20, save_every=5, snapshot_every=4, resume=True)
    train(cfg, quiet=True)
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == [f"step-{s:07d}" for s in (3, 8, 12, 16, 20)]


def test_a_checkpoint_that_did_not_record_a_dict_key_resumes_with_its_default(tmp_path):
    """A checkpoint from before `column_map`/`method_options` were recorded: those keys had their defaults ({}),
    so resuming with the defaults is no change (it was refused as `column_map PydanticUndefined -> {}`)."""
    from deltatune.train.run_folder import compare_for_resume

    cfg = load_config(overrides={"model": "m", "data": "d.jsonl", "output": str(tmp_path / "run")})
    saved = cfg.model_dump(mode="json")
    for key in ("column_map", "method_options"):
        saved.pop(key)
    assert compare_for_resume(cfg, {"config": saved}, {}) == {}


def test_a_config_yaml_that_no_longer_parses_beside_an_old_checkpoint_is_no_traceback(tmp_path):
    """A checkpoint that did not record its config falls back to config.yaml; one hand-broken is no config."""
    from deltatune.train.run_folder import compare_for_resume

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("lr: [1e-3\n")
    cfg = load_config(overrides={"model": "m", "data": "d.jsonl", "output": str(tmp_path / "run")})
    assert compare_for_resume(cfg, {}, {}) == {}


def test_train_says_when_a_shared_setting_is_not_used_by_the_method(tiny_dir, data_file, tmp_path, capsys):
    """`--method adapter --rank 4`: the bottleneck keeps its own width; the run says rank and alpha change
    nothing instead of training quietly with something other than what was asked."""
    cfg = tiny_train_config(tiny_dir, data_file, tmp_path / "run", method="adapter", steps=1, eval_fraction=0.0)
    train(cfg, quiet=True)
    err = capsys.readouterr().err
    assert "warning: rank 4 is not used by adapter: it changes nothing" in err
    assert "warning: alpha 8.0 is not used by adapter" in err
    train(tiny_train_config(tiny_dir, data_file, tmp_path / "lora", steps=1, eval_fraction=0.0), quiet=True)
    assert "is not used by" not in capsys.readouterr().err


def test_yaml_floats_written_without_a_dot_are_numbers(tmp_path):
    """`steps: 1e3` (YAML 1.2's float; YAML 1.1 wants `1.0e3`) was text and refused as "unable to parse string
    as an integer"; `lr: 1e-4` only worked because the text happened to convert."""
    from deltatune.config import load_yaml

    assert load_yaml("lr: 1e-4\nsteps: 1e3\nwarmup_steps: 3\nweight_decay: 1.5e-2") == {
        "lr": 1e-4, "steps": 1000.0, "warmup_steps": 3, "weight_decay": 0.015
    }  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ndata: d.jsonl\nsteps: 2e1\nlr: 3E-4\n")
    cfg = load_config(path)
    assert cfg.steps == 20 and cfg.lr == 3e-4
