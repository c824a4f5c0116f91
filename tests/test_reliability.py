"""Issue 15, item by item: nothing a user owns is destroyed, resume continues the same run or refuses,
damaged checkpoints are skipped, and mistakes are caught before weights load (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from reliability_helpers import cli, snapshot, train_args
from safetensors.torch import load_file


@pytest.fixture(scope="session")
def run_dir(tiny_dir, data_file, tmp_path_factory) -> Path:
    """A finished 3-step tiny LoRA run with a checkpoint per step (copy it before changing it)."""
    from deltatune.cli import main

    out = tmp_path_factory.mktemp("runs") / "run"
    assert main([str(a) for a in train_args(tiny_dir, data_file, out, "--save-every", "1")]) == 0
    return out


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    return out


def _one_error_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


# ----------------------------------------------------------------------------- 1. merge/export outputs
def test_merge_refuses_a_folder_with_the_users_files(capsys, run_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    before = snapshot(out)
    rc, _, err = cli(capsys, "merge", "--adapter", run_dir / "final", "--out", out)
    assert rc == 2
    _one_error_line(err, str(out), "--overwrite")
    assert snapshot(out) == before


def test_merge_never_replaces_the_model_or_the_run_that_holds_the_adapter(capsys, tiny_dir, run_dir):
    before = snapshot(tiny_dir, run_dir)
    for out in (tiny_dir, run_dir, run_dir / "final", run_dir / "final" / "sub"):
        rc, _, err = cli(
            capsys, "merge", "--adapter", run_dir / "final", "--model", tiny_dir, "--out", out, "--overwrite"
        )
        assert rc == 2, out
        _one_error_line(err, "being read")
    assert snapshot(tiny_dir, run_dir) == before


def test_export_refuses_a_data_file_and_replaces_a_folder_only_with_overwrite(capsys, tiny_dir, data_file, tmp_path):
    before = snapshot(data_file)
    rc, _, err = cli(capsys, "export", "--model", tiny_dir, "--out", data_file)
    assert rc == 2
    _one_error_line(err, "--overwrite")
    assert snapshot(data_file) == before
    out = tmp_path / "old"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    rc, _, err = cli(capsys, "export", "--model", tiny_dir, "--out", out, "--overwrite")
    assert rc == 0, err
    assert (out / "config.json").exists() and not (out / "stale.txt").exists()


def test_merge_warns_about_another_base(capsys, run_dir, tiny_dir, tmp_path):
    other = tmp_path / "other-base"
    shutil.copytree(tiny_dir, other)  # same shapes, another model as far as anyone can tell
    rc, _, err = cli(capsys, "merge", "--adapter", run_dir / "final", "--model", other, "--out", tmp_path / "m")
    assert rc == 0
    assert "warning" in err and "trained on" in err


# ----------------------------------------------------------------------------- 2. a finished run
def test_a_finished_run_without_checkpoints_is_not_overwritten(capsys, tiny_dir, data_file, tmp_path):
    out = tmp_path / "run"
    assert cli(capsys, *train_args(tiny_dir, data_file, out))[0] == 0
    before = snapshot(out)
    rc, _, err = cli(capsys, *train_args(tiny_dir, data_file, out))
    assert rc == 2
    _one_error_line(err, "already holds a run", "--overwrite")
    assert snapshot(out) == before
    rc, _, err = cli(capsys, *train_args(tiny_dir, data_file, out, "--overwrite"))
    assert rc == 0, err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_overwrite_replaces_only_a_run(capsys, tiny_dir, data_file, tmp_path):
    """A user's folder that happens to hold a `final/` (or a config.yaml of their own) is not a run."""
    out = tmp_path / "thesis"
    (out / "final").mkdir(parents=True)
    (out / "final" / "thesis.txt").write_text("years of work")
    (out / "config.yaml").write_text("lr: 1\n")
    before = snapshot(out)
    rc, _, err = cli(capsys, *train_args(tiny_dir, data_file, out, "--overwrite"))
    assert rc == 2
    _one_error_line(err, "not a deltatune run")
    assert snapshot(out) == before


def test_overwrite_never_removes_the_data_being_read(capsys, tiny_dir, data_file, run_copy):
    data = run_copy / "checkpoints" / "train.jsonl"
    shutil.copy(data_file, data)
    before = snapshot(run_copy)
    rc, _, err = cli(capsys, *train_args(tiny_dir, data, run_copy, "--overwrite"))
    assert rc == 2
    _one_error_line(err, "data being read")
    assert snapshot(run_copy) == before


# ----------------------------------------------------------------------------- 3. resume = the same run
def test_resume_refuses_other_data_and_lr_naming_each(capsys, tiny_dir, data_file, run_copy, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text(data_file.read_text().replace("answer", "result"))
    before = snapshot(run_copy)
    rc, _, err = cli(capsys, *train_args(tiny_dir, other, run_copy, "--resume", "--lr", "1e-2", steps=5))
    assert rc == 2
    _one_error_line(err, "lr 0.005 -> 0.01", "data content")
    assert snapshot(run_copy) == before


def test_resume_with_another_rank_or_method_is_one_line(capsys, tiny_dir, data_file, run_copy):
    for flag in (["--rank", "8"], ["--method", "dora"]):
        args = train_args(tiny_dir, data_file, run_copy, "--resume", steps=5)
        i = args.index(flag[0])
        args[i + 1] = flag[1]
        rc, _, err = cli(capsys, *args)
        assert rc == 2
        _one_error_line(err, flag[0].lstrip("-"))


def test_resume_applies_a_new_step_count_and_records_it(capsys, tiny_dir, data_file, run_copy):
    rc, out, err = cli(capsys, *train_args(tiny_dir, data_file, run_copy, "--resume", "--save-every", "1", steps=5))
    assert rc == 0, err
    text = (run_copy / "config.yaml").read_text()
    assert "#   step 3: steps 3 -> 5" in text
    assert yaml.safe_load(text)["steps"] == 5
    assert [json.loads(line)["step"] for line in (run_copy / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
        5,
    ]
    meta = json.loads((run_copy / "checkpoints" / "step-0000005" / "meta.json").read_text())
    assert meta["history"] == [{"step": 3, "changes": {"steps": [3, 5]}}]


def test_resume_without_a_run_is_refused(capsys, tiny_dir, data_file, tmp_path):
    rc, _, err = cli(capsys, *train_args(tiny_dir, data_file, tmp_path / "none", "--resume"))
    assert rc == 2
    _one_error_line(err, "nothing to resume")
    assert not (tmp_path / "none").exists()


# ----------------------------------------------------------------------------- 4. damaged checkpoints
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(capsys, tiny_dir, data_file, run_copy):
    ckpts = sorted((run_copy / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-0000002", "step-0000003"]
    weights = ckpts[-1] / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])  # a copy cut short
    rc, _, err = cli(capsys, *train_args(tiny_dir, data_file, run_copy, "--resume", "--save-every", "1", steps=4))
    assert rc == 0, err
    assert "step-0000003 is damaged" in err
    metrics = [json.loads(line)["step"] for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [1, 2, 3, 4]  # step 3 was trained again, from step 2's checkpoint


def test_resume_after_falling_back_redoes_the_step_exactly(capsys, tiny_dir, data_file, run_dir, run_copy):
    state = run_copy / "checkpoints" / "step-0000003" / "trainer_state.pt"
    raw = bytearray(state.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte: same size, other content
    state.write_bytes(bytes(raw))
    rc, _, err = cli(capsys, *train_args(tiny_dir, data_file, run_copy, "--resume", "--save-every", "1"))
    assert rc == 0, err
    assert "step-0000003 is damaged" in err
    want = load_file(str(run_dir / "checkpoints" / "step-0000003" / "trainable.safetensors"))
    got = load_file(str(run_copy / "checkpoints" / "step-0000003" / "trainable.safetensors"))
    assert all(torch.equal(want[k], got[k]) for k in want)  # step 3 again, from step 2: the same weights


def test_every_checkpoint_damaged_is_one_line(capsys, tiny_dir, data_file, run_copy):
    for ckpt in (run_copy / "checkpoints").iterdir():
        (ckpt / "trainable.safetensors").write_bytes(b"garbage")
    before = snapshot(run_copy)
    rc, _, err = cli(capsys, *train_args(tiny_dir, data_file, run_copy, "--resume", steps=5))
    assert rc == 2
    lines = err.splitlines()
    assert len(lines) == 3 and all(line.startswith("warning:") for line in lines[:2])  # the two checkpoints
    assert "no intact checkpoint" in lines[-1]
    assert "Traceback" not in err
    assert snapshot(run_copy) == before


# ----------------------------------------------------------------------------- 5. memory follows seq_len
def test_a_huge_record_is_cut_before_tokenizing_with_the_same_tokens(tiny_tok, monkeypatch):
    from deltatune.data import pipeline

    records = [
        {"instruction": "Repeat the word.", "output": "word, " * 150_000},  # 900k characters
        {"instruction": "hi " * 50_000, "output": "ok"},  # the response lies past max_len
        {"instruction": "Short?", "output": "Yes."},
    ]
    seen: list[int] = []
    real = pipeline.tokenize_examples

    def spy(examples, tokenizer, **kw):
        seen.extend(sum(len(s.text) for s in ex.segments) for ex in examples)
        return real(examples, tokenizer, **kw)

    monkeypatch.setattr(pipeline, "tokenize_examples", spy)
    cut = pipeline.prepare_records(records, tiny_tok, max_len=64)
    assert max(seen) < pipeline.char_budget(64, tiny_tok) + 200 < 100_000  # the template adds a few characters
    monkeypatch.setattr(pipeline, "char_budget", lambda max_len, tok: 10**9)  # reference: tokenize everything
    whole = pipeline.prepare_records(records, tiny_tok, max_len=64)
    assert [e.input_ids for e in cut.examples] == [e.input_ids for e in whole.examples]
    assert [e.roles for e in cut.examples] == [e.roles for e in whole.examples]
    assert (cut.report.truncated, cut.report.dropped_no_loss) == (whole.report.truncated, whole.report.dropped_no_loss)
    dropped = pipeline.prepare_records(records, tiny_tok, max_len=64, overflow="drop")
    assert dropped.report.dropped_too_long == 2


# ----------------------------------------------------------------------------- 12. exact resume, any precision
@pytest.mark.parametrize(
    "precision, dropout, compiled, kills",
    [
        ("bf16", 0.0, False, (3, 6, 9)),
        ("fp32", 0.0, False, (3, 6, 9)),
        ("bf16", 0.1, False, (3, 6, 9)),
        ("bf16", 0.1, True, (6,)),  # compiling takes ~20 s a run here: one kill point
    ],
)
def test_resume_at_several_kill_points_equals_the_straight_run(
    tiny_dir, data_file, tmp_path, precision, dropout, compiled, kills
):
    """Stopping right after a checkpoint (as a kill would) and resuming with fresh compile caches (as a
    new process has) ends bitwise where the uninterrupted run ends, with the compiled norms on (and with
    LoRA dropout: the resumed run draws the same masks; and with whole decoder layers compiled, dropout
    inside their graphs)."""
    from deltatune.config import load_config
    from deltatune.train.loop import train

    def ctrl_c_after(kill):  # the user's Ctrl-C after step `kill`: the loop checkpoints, then stops
        def hook(step, total, model):
            if step == kill:
                os.kill(os.getpid(), signal.SIGINT)

        return hook

    def cfg(out, **kw):
        return load_config(
            overrides=dict(
                model=str(tiny_dir),
                data=str(data_file),
                output=str(out),
                method="lora",
                rank=4,
                alpha=8,
                lr=5e-3,
                batch_size=2,
                seq_len=64,
                precision=precision,
                steps=12,
                seed=3,
                eval_fraction=0.1,
                warmup_steps=2,
                save_every=3,
                fused_norms="auto" if compiled else "on",
                compile_layers=compiled,
                num_threads=1,
                dropout=dropout,
                **kw,
            )
        )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch._dynamo.reset()
        train(cfg(tmp_path / "straight"), quiet=True)
        want = load_file(str(tmp_path / "straight" / "final" / "adapter_model.safetensors"))
        for kill in kills:
            out = tmp_path / f"killed-{kill}"
            torch._dynamo.reset()
            with pytest.raises(KeyboardInterrupt):
                train(cfg(out), quiet=True, on_step=ctrl_c_after(kill))
            torch._dynamo.reset()
            train(cfg(out, resume=True), quiet=True)
            got = load_file(str(out / "final" / "adapter_model.safetensors"))
            assert all(torch.equal(want[k], got[k]) for k in want), f"{precision}: resumed after step {kill} differs"
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- 6. the adapter's base
def test_generate_with_only_an_adapter_loads_the_adapters_base(capsys, run_dir):
    from deltatune.models import load_model

    model, _ = load_model(None, adapter=run_dir / "final")
    assert model.config.hidden_size == 64  # the tiny base recorded in the adapter, not the default model
    rc, out, err = cli(capsys, "generate", "--adapter", run_dir / "final", "--prompt", "hi", "--max-new-tokens", "2")
    assert rc == 0, err


# ----------------------------------------------------------------------------- 9. nothing left behind
def test_an_error_after_the_model_loads_leaves_no_output_folder(capsys, tiny_dir, data_file, tmp_path):
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *train_args(tiny_dir, data_file, out, "--method", "prefix", "--set", "attention=packed"))
    assert rc == 2 and "attention" in err.splitlines()[-1]
    assert not out.exists()


# ----------------------------------------------------------------------------- 10. metrics after a kill
def test_metrics_are_cut_back_to_the_checkpoint_on_resume(capsys, tiny_dir, data_file, run_copy):
    metrics = run_copy / "metrics.jsonl"
    with metrics.open("a") as fh:  # what a kill after step 5 (checkpoint at 3) leaves behind, torn last line
        fh.write('{"step": 4, "loss": 1.0}\n{"step": 5, "loss": 1.0}\n{"step": 6, "lo')
    rc, _, err = cli(capsys, *train_args(tiny_dir, data_file, run_copy, "--resume", "--save-every", "1", steps=5))
    assert rc == 0, err
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------- 11. smaller ones
def test_outputs_follow_the_umask(capsys, tiny_dir, tmp_path):
    old = os.umask(0o022)
    try:
        rc, _, err = cli(capsys, "export", "--model", tiny_dir, "--out", tmp_path / "exported")
    finally:
        os.umask(old)
    assert rc == 0, err
    assert (tmp_path / "exported").stat().st_mode & 0o777 == 0o755


def test_two_phase_switch_inside_the_run_is_accepted_and_after_it_refused():
    from deltatune.data.masking import parse_policy
    from deltatune.errors import ConfigError
    from deltatune.train.loop import check_switch_point

    check_switch_point(parse_policy("response->all@2"), total_steps=3, micro_before_epoch=lambda e: 10 * e)
    with pytest.raises(ConfigError, match="never run"):
        check_switch_point(parse_policy("response->all@3"), total_steps=3, micro_before_epoch=lambda e: 10 * e)
    with pytest.raises(ConfigError, match="never run"):
        check_switch_point(parse_policy("response->all@1ep"), total_steps=10, micro_before_epoch=lambda e: 10 * e)
    # 9 micro-batches an epoch, 8 a step: epoch 1 starts at micro-batch 9, inside step 1 (0-based) of 2
    check_switch_point(
        parse_policy("response->all@1ep"), total_steps=2, micro_before_epoch=lambda e: 9 * e, grad_accum=8
    )
    with pytest.raises(ConfigError, match="switches at step 2"):
        check_switch_point(
            parse_policy("response->all@2ep"), total_steps=2, micro_before_epoch=lambda e: 9 * e, grad_accum=8
        )


# ----------------------------------------------------------------------------- 13. text stays text
def test_off_and_no_stay_text_for_text_keys(tmp_path):
    from deltatune.config import load_config, parse_overrides

    assert load_config(overrides=parse_overrides(["fused_norms=off"])).fused_norms == "off"
    assert load_config(overrides=parse_overrides(["packing=no", "resume=yes"])).packing is False
    path = tmp_path / "c.yaml"
    path.write_text("fused_norms: off\npacking: no\nrslora: on\nlr: 1e-4\n")
    cfg = load_config(path)
    assert (cfg.fused_norms, cfg.packing, cfg.rslora, cfg.lr) == ("off", False, True, 1e-4)


def test_overwrite_replaces_a_run_written_before_the_config_header(capsys, tiny_dir, data_file, tmp_path):
    """Runs from before config.yaml had its header: a mapping of training keys only, still a run."""
    import yaml

    out = tmp_path / "old-run"
    rc, _, _ = cli(capsys, *train_args(tiny_dir, data_file, out))
    assert rc == 0
    settings = yaml.safe_load((out / "config.yaml").read_text())
    (out / "config.yaml").write_text(yaml.safe_dump(settings))  # the header is a comment: gone
    rc, _, err = cli(capsys, *train_args(tiny_dir, data_file, out, "--overwrite"))
    assert rc == 0, err
    assert (out / "config.yaml").read_text().startswith("# deltatune run:")
