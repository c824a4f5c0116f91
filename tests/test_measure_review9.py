"""Review 9 of measurement (`analyze`, `forgetting`): damaged or foreign runs are one line before any scoring,
no NaN in JSON, plots readable as the tables, every run kept under its own label. Each test failed before its fix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from deltatune.cli import main
from deltatune.errors import UserError


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("Loading", "Writing"))]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _adapter(base_dir: Path, out: Path, seed: int = 0) -> Path:
    """A LoRA r=2 adapter on q_proj/v_proj with a non-zero update, recording `base_dir` as its base."""
    from deltatune.methods import MethodSpec
    from deltatune.methods.apply import apply_methods
    from deltatune.models import load_model

    model, _ = load_model(str(base_dir), dtype="fp32")
    adapted = apply_methods(model, MethodSpec("lora", targets="q_proj,v_proj", rank=2, alpha=4.0))
    torch.manual_seed(seed)
    for m in adapted.model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    adapted.save_adapter(out, base_model_name_or_path=str(base_dir))
    return out


@pytest.fixture
def merged(tiny_dir, tmp_path, capsys) -> Path:
    adapter = _adapter(tiny_dir, tmp_path / "adapter")
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_dir), "--adapter", str(adapter), "--out", str(out)]) == 0
    capsys.readouterr()
    return out


def _loss_task(path: Path) -> str:
    path.write_text(
        "".join(json.dumps({"instruction": f"Add {a} and 1", "output": str(a + 1)}) + "\n" for a in range(3))
    )
    return f"loss:{path}"


def test_a_damaged_model_run_is_one_line_on_the_run_before_anything_is_scored(tiny_dir, merged, tmp_path, capsys):
    # analyze: a SafetensorError traceback; forgetting: found after the base and every earlier run were scored,
    # and blamed on field 'model', a flag the user never gave
    weights = merged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["analyze", "--base", str(tiny_dir), "--run", str(merged), "--out", str(tmp_path / "a")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"field 'run': {weights}: not a readable safetensors file" in line
    target, source = _loss_task(tmp_path / "t.jsonl"), _loss_task(tmp_path / "s.jsonl")
    args = ["forgetting", "--base", str(tiny_dir), "--run", str(merged), "--target", target, "--source", source]
    assert main([*args, "--out", str(tmp_path / "f"), "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert "evaluating" not in out and f"field 'run': {weights}: not a readable safetensors file" in _one_line(err)
    assert not (tmp_path / "f").exists() and not (tmp_path / "a").exists()


def test_a_run_of_another_shape_is_refused_naming_the_layer(tiny_dir, tmp_path, capsys):
    # layers of other shapes were skipped silently: gate/up/down vanished from the tables, exit 0
    from deltatune.testing import tiny_model, tiny_tokenizer

    other = tmp_path / "other"
    tiny_model(seed=1, intermediate_size=96).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    assert main(["analyze", "--base", str(tiny_dir), "--run", str(other), "--out", str(tmp_path / "a")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "field 'base': 'model.layers.0.mlp.gate_proj' has shape (96, 64) in the run and (128, 64)" in line
    target = _loss_task(tmp_path / "t.jsonl")
    args = ["forgetting", "--base", str(tiny_dir), "--run", str(other), "--target", target, "--source", target]
    assert main([*args, "--out", str(tmp_path / "f"), "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert "evaluating" not in out and "'model.layers.0.mlp.gate_proj.weight' has shape (96, 64)" in _one_line(err)


def test_analyze_warns_when_base_is_not_the_one_the_run_records(tiny_dir, tmp_path, capsys):
    # --base silently replaced the recorded base: two unrelated models measured as an update (rel. norm 1.43)
    from deltatune.testing import tiny_model, tiny_tokenizer

    other = tmp_path / "other-base"
    tiny_model(seed=7).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    adapter = _adapter(tiny_dir, tmp_path / "adapter")
    capsys.readouterr()
    assert main(["analyze", "--base", str(other), "--run", str(adapter), "--out", str(tmp_path / "a")]) == 0
    assert f"was trained from {tiny_dir}, not {other}" in capsys.readouterr().err
    assert main(["analyze", "--base", str(tiny_dir), "--run", str(adapter), "--out", str(tmp_path / "b")]) == 0
    assert "was trained from" not in capsys.readouterr().err


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_reports_hold_null_where_a_measure_is_not_a_number(tiny_dir, tmp_path, capsys):
    # learning/forgetting of loss-only tasks and fits of one point were written as NaN, which jq refuses
    from deltatune.fileio import strict_json

    assert strict_json({"a": [1.0, float("nan")], "b": {"c": float("inf")}, "d": "nan"}) == {
        "a": [1.0, None],
        "b": {"c": None},
        "d": "nan",
    }
    adapter = _adapter(tiny_dir, tmp_path / "adapter")
    target, source = _loss_task(tmp_path / "t.jsonl"), _loss_task(tmp_path / "s.jsonl")
    args = ["forgetting", "--base", str(tiny_dir), "--run", str(adapter), "--target", target, "--source", source]
    assert main([*args, "--out", str(tmp_path / "f"), "--no-progress"]) == 0
    report = _strict((tmp_path / "f" / "forgetting.json").read_text())
    run = next(iter(report["runs"].values()))
    assert run["learning"] is None and run["forgetting"] is None
    assert main(["analyze", "--base", str(tiny_dir), "--run", str(adapter), "--out", str(tmp_path / "a")]) == 0
    for name in ("decomposition.json", "spectrum.json"):
        _strict((tmp_path / "a" / name).read_text())


def test_plots_follow_the_umask_as_the_tables_beside_them(tmp_path):
    import matplotlib.pyplot as plt

    from deltatune.analysis.plots import _save

    old = os.umask(0o022)
    try:
        fig = plt.figure()
        path = _save(fig, tmp_path / "sub" / "plot.png")
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)  # mkstemp's 0600
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["plot.png"]


def test_runs_whose_labels_collide_keep_each_their_own_row(tiny_dir, tmp_path):
    # seed0/final and seed1/final both read "lora r=2 (final)": forgetting.json kept one of the two
    from deltatune.evaluate.runs import read_run, unique_labels

    a = _adapter(tiny_dir, tmp_path / "seed0" / "final", seed=0)
    b = _adapter(tiny_dir, tmp_path / "seed1" / "final", seed=1)
    c = _adapter(tiny_dir, tmp_path / "x" / "other", seed=2)
    labels = unique_labels([read_run(a), read_run(b), read_run(c)])
    assert labels == ["lora r=2 (seed0/final)", "lora r=2 (seed1/final)", "lora r=2 (other)"]
    with pytest.raises(UserError, match="the same run as .*given twice"):
        unique_labels([read_run(a), read_run(tmp_path / "seed1" / ".." / "seed0" / "final")])


def test_plan_counts_the_loss_head_as_train_runs_it_one_chunk_of_logits():
    # plan added the full logits (b*s*V in bf16 and fp32: 11.7 GiB of a 34 GiB Llama-3-8B plan at 8 x 2048) that
    # train's chunked head never holds; its buffers are one chunk's
    from deltatune.analysis.memory import activation_bytes
    from deltatune.testing import tiny_llama_config
    from deltatune.train import loss as loss_module

    config = tiny_llama_config()
    b, s, chunk, h, v = 4, 64, 32, config.hidden_size, config.vocab_size
    kw = dict(batch_size=b, seq_len=s, dtype=torch.bfloat16, gradient_checkpointing=False, loss_chunk=chunk)
    # only the logits grow with the vocabulary: one chunk of them, in bf16 and in fp32
    assert activation_bytes(tiny_llama_config(vocab_size=2 * v), **kw) - activation_bytes(config, **kw) == (
        chunk * v * (2 + 4)
    )
    # a chunk as large as the batch: every position's logits at once, as before
    whole = activation_bytes(config, **{**kw, "loss_chunk": b * s}) - activation_bytes(config, **kw)
    assert whole == (b * s - chunk) * v * (2 + 4)
    loss_module._workspace.release()
    hidden = torch.randn(b, s, h, dtype=torch.bfloat16, requires_grad=True)
    head = torch.nn.Linear(h, v, bias=False).to(torch.bfloat16)
    ids = torch.randint(0, v, (b, s))
    total, _ = loss_module.weighted_lm_loss_sum(hidden, head, ids, torch.ones(b, s), chunk=chunk)
    total.backward()
    held = sum(t.numel() * t.element_size() for t in loss_module._workspace.buffers.values())
    assert held == chunk * v * (2 + 4)  # what the plan counts for the logits, not b*s*v


def test_the_final_step_is_known_without_metrics_jsonl_and_final_picks_the_newest_step(tmp_path):
    # without metrics.jsonl a checkpoint at the final step was analysed twice (as itself and as final/); with no
    # final/, --checkpoints final took a step-less checkpoint (sorted last) over the newest numbered one
    from deltatune.cli.analyze import choose_snapshots
    from deltatune.evaluate.runs import RunInfo, Snapshot, last_trained_step

    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"steps": 8, "eval_loss": None}))
    assert last_trained_step(run) == 8
    steps = [Snapshot(run / f"s{i}", "checkpoint", i, f"step {i}") for i in (4, 8)]
    info = RunInfo(run, {}, "lora", 2, "lora r=2", Snapshot(run / "final", "adapter", None, "final"), steps)
    assert [s.label for s in choose_snapshots(info, "all")] == ["step 4", "final"]
    info.final, info.checkpoints = None, [*steps, Snapshot(run / "odd", "checkpoint", None, "odd")]
    assert [s.label for s in choose_snapshots(info, "final")] == ["step 8"]
