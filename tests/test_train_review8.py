"""Review 8 of run reliability: a full disk while a checkpoint or a model is written is the one-line disk error,
and a checkpoint whose meta.json says another position than its weights is skipped. Each test failed before
its fix."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from reliability_helpers import cli, train_args

from deltatune import fileio
from deltatune.errors import UserError

TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 73408 vs 73300"
SAFETENSORS_FULL_DISK = "Error while serializing: I/O error: No space left on device (os error 28)"


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_writer_failing_on_a_full_disk_is_the_disk_error_named_by_the_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(fileio, "_free_bytes", lambda folder: 4096)
    with pytest.raises(OSError) as caught, fileio.atomic_dir(out):
        raise RuntimeError(TORCH_FULL_DISK)  # torch.save's error on a full disk
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(out)
    monkeypatch.setattr(fileio, "_free_bytes", lambda folder: 10**12)
    with pytest.raises(OSError) as caught, fileio.atomic_dir(out):
        raise Exception(SAFETENSORS_FULL_DISK)  # safetensors' own error type, its errno in the text
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(out)
    with pytest.raises(RuntimeError, match="unexpected pos"), fileio.atomic_dir(out):
        raise RuntimeError(TORCH_FULL_DISK)  # space left: not the disk's, the error as it was
    # no space available (a root process sees none on a 95% full disk): only torch.save's failure is taken for it
    monkeypatch.setattr(fileio, "_free_bytes", lambda folder: 0)
    for other in (ValueError("a bug"), RuntimeError("Some tensors share memory"), UserError("cannot be written")):
        with pytest.raises(type(other), match=str(other)), fileio.atomic_dir(out):
            raise other
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_checkpoint_that_cannot_be_pruned_does_not_stop_training(tmp_path, monkeypatch):
    # pruning ignored a failed removal (another process removed it, no permission); renaming it aside first must too
    from deltatune.train import checkpoint

    root = tmp_path / "run" / "checkpoints"
    for step in (1, 2):
        (root / f"step-{step:07d}").mkdir(parents=True)
        (root / f"step-{step:07d}" / "meta.json").write_text("{}")

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fileio.os, "replace", refused)
    checkpoint.prune_checkpoints(tmp_path / "run", keep=1)
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["step-0000001", "step-0000002"]


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_earlier_ones(
    capsys, tiny_dir, data_file, tmp_path, monkeypatch
):
    # torch.save's RuntimeError and safetensors' SafetensorError are no OSError: a 40-line traceback, exit 1
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint
            raise RuntimeError(TORCH_FULL_DISK)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(fileio, "_free_bytes", lambda folder: 0)
    rc, _, err = cli(capsys, *train_args(tiny_dir, data_file, out, "--save-every", "1"))
    assert rc == 2
    line = _one_line(err)
    assert "step-0000002" in line and "no space left on device" in line, line
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000001"]  # nothing half-written


@pytest.fixture(scope="module")
def finished_run(tiny_dir, data_file, tmp_path_factory):
    from deltatune.cli import main

    out = tmp_path_factory.mktemp("runs") / "run"
    assert main([str(a) for a in train_args(tiny_dir, data_file, out, "--save-every", "1")]) == 0
    return out


@pytest.mark.parametrize("change", ["step as text", "another step", "another micro-batch"])
def test_a_checkpoint_whose_meta_json_was_changed_is_skipped(
    capsys, tiny_dir, data_file, finished_run, tmp_path, change
):
    # meta.json had no hash: a step as text was a TypeError traceback, another step resumed silently from step 3's
    # weights at step 2's position (training steps 3 again)
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    meta_file = run / "checkpoints" / "step-0000003" / "meta.json"
    meta = json.loads(meta_file.read_text())
    position = meta["position"]
    if change == "step as text":
        position["step"] = "3"
    elif change == "another step":
        position["step"] = 2
    else:
        position["micro"] += 1
    meta_file.write_text(json.dumps(meta))
    rc, _, err = cli(capsys, *train_args(tiny_dir, data_file, run, "--resume", "--save-every", "1", steps=4))
    assert rc == 0, err
    assert "step-0000003 is damaged" in err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # step 3 again, from step 2's checkpoint


def test_a_kill_while_pruning_leaves_each_checkpoint_whole_or_gone(tmp_path, monkeypatch):
    # pruning removed files one by one in place: a kill mid-way left step-N without meta.json, which neither resume
    # nor the clean-up of interrupted writes ever touched again
    from deltatune.train import checkpoint

    root = tmp_path / "run" / "checkpoints"
    for step in (1, 2, 3):
        folder = root / f"step-{step:07d}"
        folder.mkdir(parents=True)
        (folder / "trainable.safetensors").write_bytes(b"w" * 100)
        (folder / "meta.json").write_text("{}")
    before = {p.name: sorted(q.name for q in p.iterdir()) for p in root.iterdir()}

    def killed(path, *args, **kwargs):  # the process dies inside the removal, after its first file
        first = next(p for p in sorted(Path(path).rglob("*")) if p.is_file())
        first.unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(fileio.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.prune_checkpoints(tmp_path / "run", keep=2)
    monkeypatch.undo()
    visible = [p for p in root.iterdir() if not p.name.startswith(".")]
    assert all((p / "meta.json").exists() for p in visible)  # no step folder half removed
    fileio.remove_interrupted_writes(root, lambda name: name.startswith("step-"))  # what a resume does first
    after = {p.name: sorted(q.name for q in p.iterdir()) for p in root.iterdir()}
    assert after == {name: files for name, files in before.items() if name != "step-0000001"}


def test_the_final_evaluation_says_it_has_begun(capsys, tiny_dir, data_file, tmp_path):
    # after the last step's "eta 0s" the final held-out loss ran minutes on the default model with nothing shown
    args = [a for a in train_args(tiny_dir, data_file, tmp_path / "run", steps=1) if a != "--quiet"]
    rc, out, err = cli(capsys, *args)
    assert rc == 0, err
    lines = out.splitlines()
    begun = next(i for i, line in enumerate(lines) if line.startswith("final evaluation: held-out loss on "))
    done = next(i for i, line in enumerate(lines) if line.startswith("final eval loss "))
    assert begun < done
    assert (
        lines[begun] == "final evaluation: held-out loss on 3 examples"
    )  # eval_fraction 0.1 of 36 records, rounded down


def test_a_log_shows_the_first_step_not_only_every_log_every(capsys, tiny_dir, data_file, tmp_path):
    # with log_every 10 a run printed nothing for its first 10 steps: on the default model, minutes after start
    args = [a for a in train_args(tiny_dir, data_file, tmp_path / "run", steps=3) if a != "--quiet"]
    rc, out, err = cli(capsys, *args, "--set", "log_every=10")
    assert rc == 0, err
    steps = [line.split()[1] for line in out.splitlines() if line.startswith("step ")]
    assert steps == ["1/3", "3/3"]


def test_a_run_folder_given_as_the_adapter_names_its_final_folder(capsys, tiny_dir, data_file, tmp_path):
    run = tmp_path / "run"
    assert cli(capsys, *train_args(tiny_dir, data_file, run, steps=1))[0] == 0
    rc, _, err = cli(capsys, "generate", "--adapter", run, "--prompt", "hi", "--max-new-tokens", "2")
    assert rc == 2
    assert _one_line(err).endswith(f"a training run's adapter is its {run / 'final'}")


def test_a_bad_record_of_a_loss_task_is_one_line_before_the_model_loads(capsys, tiny_dir, tmp_path, monkeypatch):
    # the other tasks' data was read first; a loss task's only after the model had loaded (minutes on a large one)
    import deltatune.models

    data = tmp_path / "held-out.jsonl"
    data.write_text('{"instruction": "What is 2 + 3?", "output": "5"}\n{"instruction": "Empty?", "output": ""}\n')
    loaded = []
    real = deltatune.models.load_model
    monkeypatch.setattr(deltatune.models, "load_model", lambda *a, **k: loaded.append(1) or real(*a, **k))
    rc, _, err = cli(capsys, "eval", "--model", tiny_dir, "--task", f"loss:{data}")
    assert rc == 2 and not loaded
    assert f"{data}:2" in _one_line(err) and "output" in _one_line(err)
