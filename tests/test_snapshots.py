"""`snapshot_every`: intermediate trainable weights kept (never pruned), and `deltatune analyze` following
the DoRA paper's protocol (3 intermediate snapshots + final) with the spectrum over training time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltatune.testing import tiny_train_config
from deltatune.train.loop import train


def _cfg(tiny_dir, data_file, out, **kw):
    return tiny_train_config(tiny_dir, data_file, out, **{"targets": "q_proj,v_proj", **kw})


@pytest.fixture(scope="module")
def snap_run(tmp_path_factory, tiny_dir, data_file) -> Path:
    out = tmp_path_factory.mktemp("snap") / "run"
    train(_cfg(tiny_dir, data_file, out, snapshot_every=2, save_every=2), quiet=True)
    return out


def test_snapshots_are_kept_and_hold_the_weights_of_their_step(snap_run):
    from deltatune.train.checkpoint import WEIGHTS_FILE, list_checkpoints

    snaps = sorted(p.name for p in (snap_run / "snapshots").iterdir())
    assert snaps == ["step-0000002", "step-0000004", "step-0000006", "step-0000008"]  # none pruned
    assert [p.name for p in list_checkpoints(snap_run)] == ["step-0000006", "step-0000008"]  # checkpoints: last two
    for step in (6, 8):  # the same step's checkpoint holds bitwise the same trainable tensors
        a = load_file(str(snap_run / "snapshots" / f"step-{step:07d}" / WEIGHTS_FILE))
        b = load_file(str(snap_run / "checkpoints" / f"step-{step:07d}" / WEIGHTS_FILE))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    early = load_file(str(snap_run / "snapshots" / "step-0000002" / WEIGHTS_FILE))
    late = load_file(str(snap_run / "snapshots" / "step-0000008" / WEIGHTS_FILE))
    assert any(not torch.equal(early[k], late[k]) for k in early if "lora_B" in k)  # weights moved between them
    meta = json.loads((snap_run / "snapshots" / "step-0000004" / "meta.json").read_text())
    assert meta["position"]["step"] == 4 and meta["kind"] == "snapshot"
    assert not [p for p in (snap_run / "snapshots").iterdir() if p.name.startswith(".")]  # no temp folders left


def test_read_run_counts_each_step_once_preferring_the_snapshot(snap_run):
    from deltatune.evaluate.runs import last_trained_step, read_run

    info = read_run(snap_run)
    assert [c.step for c in info.checkpoints] == [2, 4, 6, 8]
    assert all(c.path.parent.name == "snapshots" for c in info.checkpoints)
    assert last_trained_step(snap_run) == 8


def test_protocol_picks_three_intermediate_snapshots_and_final(snap_run):
    from deltatune.cli.analyze import choose_snapshots
    from deltatune.evaluate.runs import Snapshot, read_run

    info = read_run(snap_run)
    chosen = choose_snapshots(info, "protocol")
    assert [s.step for s in chosen[:-1]] == [2, 4, 6] and chosen[-1].label == "final"  # step 8 is final's
    info.checkpoints = [Snapshot(Path(f"s{i}"), "checkpoint", i, f"step {i}") for i in range(1, 10)]
    chosen = choose_snapshots(info, "protocol")
    assert [s.step for s in chosen[:-1]] == [1, 4, 7]  # of the 7 intermediate (1..7): first, middle, last
    assert [s.step for s in choose_snapshots(info, "all")[:-1]] == list(range(1, 8))
    assert [s.label for s in choose_snapshots(info, "final")] == ["final"]


def test_analyze_follows_the_protocol_with_spectrum_over_time(snap_run, tiny_dir, tmp_path):
    from deltatune.cli import main

    out = tmp_path / "analysis"
    assert main(["analyze", "--base", str(tiny_dir), "--run", str(snap_run), "--out", str(out)]) == 0
    dec = json.loads((out / "decomposition.json").read_text())
    assert [s["step"] for s in dec["snapshots"]] == [2, 4, 6, None]
    types = {"q_proj", "v_proj"}
    by_type = dec["decomposition"]["by_type"]
    assert {(r["checkpoint"], r["type"]) for r in by_type} == {
        (c, t) for c in ("step 2", "step 4", "step 6", "final") for t in types
    }
    over = json.loads((out / "spectrum.json").read_text())["spectrum"]["over_time"]
    assert len(over) == 4 * len(types) and all(1 <= r["rank90_max"] <= 4 for r in over)  # LoRA r=4: rank <= 4
    assert (out / "spectrum_time.png").read_bytes()[:4] == b"\x89PNG"
    assert "## rank@90% over training, per layer type" in (out / "spectrum.md").read_text()
