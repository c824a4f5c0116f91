"""Data-parallel training under torchrun on CPU (gloo, 2 processes) against single-process runs.

Reference: the same training in one process with batch_size x 2. Two processes must reach the same
weights (1e-5, fp32) and optimizer state, write the same files, log once, and resume across process
counts in both directions. A failing rank must bring the whole run down, leaving no process behind.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from deltatune.config import load_config
from deltatune.errors import ConfigError, TrainingError
from deltatune.train.checkpoint import STATE_FILE, WEIGHTS_FILE, Position, list_checkpoints
from deltatune.train.distributed import Distributed, remap_position, torchrun_command
from deltatune.train.loop import train

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-5
# data_file (conftest): 36 records, 3 held out: 33 examples pack into 17 rows of 64 tokens, so with 4 rows
# per global micro-batch the 5th micro-batch has ONE row and rank 1's share is empty (runs a zero-weight row).


def _settings(tiny_dir, data_file, out, **kw) -> dict:
    # constant lr: runs of different lengths (3 vs 4 steps) share a schedule, so resumed runs compare
    base = dict(
        model=str(tiny_dir),
        data=str(data_file),
        output=str(out),
        method="lora",
        rank=4,
        alpha=8,
        lr=5e-3,
        batch_size=4,
        grad_accum=2,
        seq_len=64,
        precision="fp32",
        steps=3,
        seed=3,
        eval_fraction=0.1,
        warmup_steps=0,
        schedule="constant",
        eval_every=2,
        device="cpu",
    )
    base.update(kw)
    return base


def _single(settings: dict):
    threads = torch.get_num_threads()
    try:  # one thread, like each torchrun worker (OMP_NUM_THREADS=1); far faster on a busy machine
        return train(load_config(overrides={**settings, "num_threads": 1}), quiet=True)
    finally:
        torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marked_pids(marker: str) -> list[int]:
    """Our processes still alive that carry `marker` in their environment."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker.encode() in (proc / "environ").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def _launch(args: list[str], *, extra_env: dict | None = None, timeout: float = 150) -> tuple[int, str]:
    """Run a command to completion with a unique marker in its environment; fail if anything outlives it."""
    marker = f"dt-{uuid.uuid4().hex}"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "DELTATUNE_TEST_MARKER": marker,
        "PYTHONFAULTHANDLER": "1",  # a worker sent SIGABRT prints every thread's stack: where a hang waits
        **(extra_env or {}),
    }
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in _marked_pids(marker):  # first the stacks of the processes still running, for the failure
            try:
                os.kill(pid, signal.SIGABRT)
            except ProcessLookupError:
                pass
        time.sleep(3)
        for pid in [proc.pid, *_marked_pids(marker)]:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        out, _ = proc.communicate()
        pytest.fail(f"run did not finish in {timeout}s:\n{out[-8000:]}")
    deadline = time.time() + 10  # workers torn down by torchrun may take a moment to be reaped
    while _marked_pids(marker) and time.time() < deadline:
        time.sleep(0.2)
    left = _marked_pids(marker)
    assert not left, f"processes left behind: {left}"
    return proc.returncode, out


def _torchrun(settings: dict, *flags: str, extra_env: dict | None = None) -> tuple[int, str]:
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "deltatune",
        "train",
        "--quiet",
        *flags,
    ]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return _launch(args, extra_env=extra_env)


def _checkpoint(run: Path, step: int) -> Path:
    return next(p for p in list_checkpoints(run) if p.name == f"step-{step:07d}")


def _assert_close(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], atol=TOL, rtol=0, msg=k)


def _optimizer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / STATE_FILE, weights_only=True)["optimizer"]


# ------------------------------------------------------------------------------------------------
# two processes against one
# ------------------------------------------------------------------------------------------------
def test_lora_ddp_matches_single_process_and_resumes_in_one(tiny_dir, data_file, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _single(_settings(tiny_dir, data_file, one, steps=4, save_every=1))
    rc, out = _torchrun(_settings(tiny_dir, data_file, two, batch_size=2, save_every=3))
    assert rc == 0, out[-3000:]

    _assert_close(
        load_file(str(_checkpoint(two, 3) / WEIGHTS_FILE)), load_file(str(_checkpoint(one, 3) / WEIGHTS_FILE))
    )
    # rank 0 alone writes metrics: one line per step, global losses equal to the single run's
    metrics_one = [json.loads(l) for l in (one / "metrics.jsonl").read_text().splitlines()][:3]
    metrics_two = [json.loads(l) for l in (two / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics_two] == [1, 2, 3]
    for a, b in zip(metrics_one, metrics_two):
        assert abs(a["loss"] - b["loss"]) < TOL and a["tokens"] == b["tokens"]
    assert abs(metrics_one[1]["eval_loss"] - metrics_two[1]["eval_loss"]) < TOL
    assert (two / "final" / "adapter_config.json").exists() and (two / "best" / "adapter_config.json").exists()
    meta = json.loads((_checkpoint(two, 3) / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["global_batch_rows"] == 4

    # resume the 2-process run in ONE process (same global batch): step 4 equals the single run's step 4
    _single(_settings(tiny_dir, data_file, two, steps=4, save_every=1, resume=True))
    _assert_close(
        load_file(str(_checkpoint(two, 4) / WEIGHTS_FILE)), load_file(str(_checkpoint(one, 4) / WEIGHTS_FILE))
    )


def test_full_fsdp_resumes_single_process_checkpoint_and_matches(tiny_dir, data_file, tmp_path):
    """FSDP2 full finetuning on gloo: load a single-process checkpoint into shards, train the step whose
    second rank has an empty share, gather, and write the single-process files with the same values."""
    one, two = tmp_path / "one", tmp_path / "two"
    _single(_settings(tiny_dir, data_file, one, method="full", lr=1e-3, save_every=1))
    shutil.copytree(one, two)
    shutil.rmtree(_checkpoint(two, 3))
    for sub in ("final", "best"):
        shutil.rmtree(two / sub)
    rc, out = _torchrun(
        _settings(tiny_dir, data_file, two, method="full", lr=1e-3, batch_size=2, save_every=1, resume=True)
    )
    assert rc == 0, out[-3000:]

    ref, got = _checkpoint(one, 3), _checkpoint(two, 3)
    _assert_close(load_file(str(got / WEIGHTS_FILE)), load_file(str(ref / WEIGHTS_FILE)))
    s_ref, s_got = _optimizer_state(ref), _optimizer_state(got)
    assert s_got["param_groups"] == s_ref["param_groups"]
    assert sorted(s_got["state"]) == sorted(s_ref["state"])
    for i in s_ref["state"]:
        _assert_close(s_got["state"][i], s_ref["state"][i])
    _assert_close(
        load_file(str(two / "final" / "model.safetensors")), load_file(str(one / "final" / "model.safetensors"))
    )
    assert (two / "final" / "config.json").exists() and (two / "final" / "tokenizer.json").exists()


# ------------------------------------------------------------------------------------------------
# failure
# ------------------------------------------------------------------------------------------------
_FAIL_ON_RANK_1 = """
# Test-only start-up file (sitecustomize, on PYTHONPATH for one test): rank 1 fails at its first batch.
import os
if os.environ.get("RANK") == "1":
    from deltatune.train import distributed

    def _fail(self, rows, make):
        raise RuntimeError(f"injected failure on rank {self.rank}")

    distributed.Distributed.local_batch = _fail
"""


def test_failing_rank_stops_the_whole_run(tiny_dir, data_file, tmp_path):
    """`deltatune train --nproc 2` (re-launched under torchrun): rank 1 raises at its first step while
    rank 0 waits in the loss-weight all-reduce; torchrun must end rank 0 and report rank 1's error. The
    failure is injected from outside the product: a sitecustomize on PYTHONPATH patches rank 1 only."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_FAIL_ON_RANK_1)
    path = os.pathsep.join([str(inject), str(REPO), os.environ.get("PYTHONPATH", "")])
    s = _settings(tiny_dir, data_file, tmp_path / "run")
    args = [sys.executable, "-m", "deltatune", "train", "--nproc", "2", "--quiet"]
    args += [f"--set={k}={v}" for k, v in s.items()]
    rc, out = _launch(args, extra_env={"PYTHONPATH": path}, timeout=120)
    assert rc != 0
    assert "injected failure on rank 1" in out
    assert "ChildFailedError" in out or "FAILED" in out
    assert not list_checkpoints(tmp_path / "run")


# ------------------------------------------------------------------------------------------------
# pieces, without processes
# ------------------------------------------------------------------------------------------------
def _fake_collate(rows: list) -> dict:
    if not rows or not any(r["w"] for r in rows):
        raise TrainingError("no loss")
    return {
        "input_ids": torch.tensor([[r["id"]] * 2 for r in rows]),
        "loss_weights": torch.tensor([[0.0, r["w"]] for r in rows]),
        "n_real_tokens": 2 * len(rows),
    }


def _row(i, w=1.0):
    return {"id": i, "w": w}


def test_local_batch_takes_strided_rows_and_zero_weight_row_when_share_is_empty():
    rows = [_row(i) for i in range(5)]
    r0 = Distributed(rank=0, world=2, active=True)
    r1 = Distributed(rank=1, world=2, active=True)
    assert r0.local_batch(rows, _fake_collate)["input_ids"][:, 0].tolist() == [0, 2, 4]
    assert r1.local_batch(rows, _fake_collate)["input_ids"][:, 0].tolist() == [1, 3]
    # one row: rank 1 has nothing, runs global row 0 with zero weight
    only = r1.local_batch([_row(7)], _fake_collate)
    assert only["input_ids"].tolist() == [[7, 7]] and float(only["loss_weights"].sum()) == 0.0
    # rank 1's rows carry no loss: same fallback
    assert float(r1.local_batch([_row(0), _row(1, 0.0)], _fake_collate)["loss_weights"].sum()) == 0.0
    # the whole global batch carries no loss: the single-process error
    with pytest.raises(TrainingError):
        r1.local_batch([_row(0, 0.0), _row(1, 0.0)], _fake_collate)
    # single process: untouched
    assert Distributed().local_batch(rows, _fake_collate)["input_ids"].shape[0] == 5


def test_one_process_under_torchrun_keeps_its_random_stream():
    """torchrun with one process re-seeded the stream as a rank of many, so with dropout on, `--nproc 1` trained
    another model than a plain run (docs/distributed.md says they are bitwise equal). Ranks of several processes
    each get their own stream."""
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    Distributed(rank=0, world=1, active=True).seed_own_streams(5)
    assert torch.equal(torch.rand(3), expected)
    Distributed(rank=0, world=2, active=True).seed_own_streams(5)
    rank0 = torch.rand(3)
    Distributed(rank=1, world=2, active=True).seed_own_streams(5)
    assert not torch.equal(torch.rand(3), rank0)


def test_local_batch_reports_global_token_count():
    rows = [[_Sized(3), _Sized(4)], [_Sized(5)]]  # packed rows of examples
    fake = lambda rs: {"input_ids": torch.zeros(len(rs), 1), "loss_weights": torch.ones(len(rs), 2), "n_real_tokens": 0}
    assert Distributed(rank=1, world=2, active=True).local_batch(rows, fake)["n_real_tokens"] == 12


class _Sized:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def _fake_data(rows_per_epoch: int, batch: int):
    rows = list(range(rows_per_epoch))
    batches = [rows[i : i + batch] for i in range(0, rows_per_epoch, batch)]
    return SimpleNamespace(cfg=SimpleNamespace(batch_size=batch), epoch_batches=lambda e: batches)


def test_remap_position_across_global_batch_sizes():
    # 4 micro-batches of 4 rows done = 16 rows -> 8 micro-batches of 2, or 2 of 8
    assert remap_position(Position(step=2, epoch=0, micro=4), 4, _fake_data(17, 2), Path("c")).micro == 8
    assert remap_position(Position(step=2, epoch=1, micro=4), 4, _fake_data(17, 8), Path("c")).micro == 2
    # same global batch: untouched
    assert remap_position(Position(micro=3), 4, _fake_data(17, 4), Path("c")).micro == 3
    # end of epoch (17 rows, last batch short) maps to the end of the new epoch
    assert remap_position(Position(micro=5), 4, _fake_data(17, 8), Path("c")).micro == 3
    # 12 rows done cannot be split into batches of 8: one-line refusal naming the numbers
    with pytest.raises(ConfigError, match="12 rows"):
        remap_position(Position(micro=3), 4, _fake_data(17, 8), Path("c"))


def test_nproc_builds_a_standalone_torchrun_command():
    cmd = torchrun_command(4, ["train", "cfg.yaml", "--nproc", "4", "--lr", "1e-4", "--nproc=4"])
    assert cmd[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "4",
        "-m",
        "deltatune",
        "train",
        "cfg.yaml",
        "--lr",
        "1e-4",
    ]
    with pytest.raises(ConfigError):
        torchrun_command(0, ["train"])


def test_global_config_scales_batch_and_refuses_fused_update():
    cfg = load_config(overrides={"batch_size": 3, "method": "full"})
    assert Distributed(world=2, active=True).global_config(cfg).batch_size == 6
    assert Distributed().global_config(cfg).batch_size == 3
    with pytest.raises(ConfigError, match="fused_update"):
        Distributed(world=2, active=True).global_config(load_config(overrides={"method": "full", "fused_update": True}))


def test_fused_norms_on_is_refused_under_several_processes():
    """Under FSDP2 the swapped-in fused norms' weights were not the sharded ones: full finetuning's final/ kept the
    untrained norm weights (review). `auto` already ran several processes without them; `on` is now one line."""
    with pytest.raises(ConfigError, match="fused_norms"):
        Distributed(world=2, active=True).global_config(load_config(overrides={"method": "full", "fused_norms": "on"}))
    assert Distributed().global_config(load_config(overrides={"fused_norms": "on"})).fused_norms == "on"


def test_nproc_under_torchrun_is_refused_not_launched_again(monkeypatch):
    """`deltatune train --nproc 2` started by torchrun launched torchrun again in every process: N x N processes in
    separate groups, all writing the same output folder."""
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="under torchrun"):
        torchrun_command(2, ["train", "--nproc", "2"])


def test_lora_on_an_upcycled_models_experts_matches_single_process(tiny_dir, data_file, tmp_path):
    """An expert that no token of one rank's batch chose has no gradient there: with find_unused_parameters off,
    DDP never summed its bucket, so the run stopped at the next step ("Expected to have finished reduction"), or,
    on a run's last step, saved weights that differed from a single process's (review)."""
    from deltatune.cli import main

    moe = tmp_path / "moe"
    assert main(["upcycle", "--model", str(tiny_dir), "--experts", "8", "--out", str(moe)]) == 0
    kw = dict(model=str(moe), targets="all-linear", lr=1e-2, moe_aux_loss=0, moe_z_loss=0, steps=4, save_every=2)
    one, two = tmp_path / "one", tmp_path / "two"
    _single(_settings(tiny_dir, data_file, one, log_every=2, **kw))
    rc, out = _torchrun(_settings(tiny_dir, data_file, two, batch_size=2, log_every=2, **kw))
    assert rc == 0, out[-3000:]
    _assert_close(
        load_file(str(_checkpoint(two, 4) / WEIGHTS_FILE)), load_file(str(_checkpoint(one, 4) / WEIGHTS_FILE))
    )
    # the routing metrics are the job's, not rank 0's share: the expert loads are those of one process
    logged = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
    loads = [[m["expert_load"] for m in run if "expert_load" in m] for run in logged]
    assert len(loads[0]) == 2 and loads[0][0] == loads[1][0]  # step 2 (later, last-bit differences flip a token)
    torch.testing.assert_close(torch.tensor(loads[0][1]), torch.tensor(loads[1][1]), atol=0.01, rtol=0)


def test_full_finetuning_of_an_upcycled_model_saves_under_fsdp(tiny_dir, data_file, tmp_path):
    """FSDP2 gathered the model into the dense class of its config, which has no MoE blocks: an upcycled model's
    full finetuning stopped at its first best/ or final/ save ("gathered state lacks ...") (review)."""
    from deltatune.cli import main

    moe = tmp_path / "moe"
    assert main(["upcycle", "--model", str(tiny_dir), "--experts", "4", "--out", str(moe)]) == 0
    # Adam moves each weight by about lr a step whatever its gradient's size, so gradients that differ in the last
    # bits (summed in another order) can move a weight by 2 lr: a small lr keeps that under the tolerance
    kw = dict(model=str(moe), method="full", lr=1e-6, steps=3)
    one, two = tmp_path / "one", tmp_path / "two"
    _single(_settings(tiny_dir, data_file, one, **kw))
    rc, out = _torchrun(_settings(tiny_dir, data_file, two, batch_size=2, **kw))
    assert rc == 0, out[-3000:]
    saved = load_file(str(two / "final" / "model.safetensors"))
    _assert_close(saved, load_file(str(one / "final" / "model.safetensors")))
    before = load_file(str(moe / "model.safetensors"))
    assert max(float((saved[k] - before[k]).abs().max()) for k in before if before[k].numel()) > 1e-7  # it trained


def test_a_two_process_run_with_dropout_resumes_exactly(tiny_dir, data_file, tmp_path):
    """Every rank drew the same dropout stream and the checkpoint kept rank 0's alone, which every rank restored:
    ranks whose shares draw other amounts of randomness (uneven rows) went on differently after a resume (weights
    1.4e-2 apart at step 4) (review). Each rank now has its own stream, saved and restored."""
    kw = dict(batch_size=2, steps=4, save_every=2, dropout=0.2, packing=False)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    rc, out = _torchrun(_settings(tiny_dir, data_file, whole, **kw))
    assert rc == 0, out[-3000:]
    shutil.copytree(whole, resumed)
    for sub in ("final", "best"):
        shutil.rmtree(resumed / sub, ignore_errors=True)
    shutil.rmtree(_checkpoint(resumed, 4))
    rc, out = _torchrun(_settings(tiny_dir, data_file, resumed, resume=True, **kw))
    assert rc == 0, out[-3000:]
    a, b = load_file(str(_checkpoint(whole, 4) / WEIGHTS_FILE)), load_file(str(_checkpoint(resumed, 4) / WEIGHTS_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(_checkpoint(whole, 2) / STATE_FILE, weights_only=True)
    assert len(state["rng_ranks"]) == 2 and not torch.equal(
        state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"]
    )


def test_a_resume_under_torchrun_checks_the_checkpoints_shapes(data_file, tmp_path):
    """The shape check ran in one process only: under torchrun a checkpoint of another shape was a copy_
    traceback on every rank (or, where a dimension was 1, a silent broadcast)."""
    from deltatune.testing import tiny_model, tiny_tokenizer

    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    run = tmp_path / "run"
    _single(_settings(model_dir, data_file, run, steps=1, save_every=1))
    tiny_model(hidden_size=96).save_pretrained(model_dir)  # the same path, another model
    # a checkpoint from before resume compared the model's content (which now refuses this earlier, on every rank)
    meta_file = _checkpoint(run, 1) / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["data_sha256"]["model"]
    meta_file.write_text(json.dumps(meta))
    rc, out = _torchrun(_settings(model_dir, data_file, run, batch_size=2, steps=2, save_every=1, resume=True))
    assert rc != 0
    assert "does not fit this model and method" in out and "must match the size" not in out, out[-3000:]
