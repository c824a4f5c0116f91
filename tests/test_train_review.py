"""Review of the training loop: defects found by comparing against a reference, each proved by a test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reliability_helpers import read_metrics

from deltatune.config import load_config
from deltatune.errors import ConfigError
from deltatune.testing import tiny_train_config
from deltatune.train.loop import save_outputs, train
from deltatune.train.optim import lr_factor

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one thread is fastest (conftest.py)


def test_metrics_log_the_learning_rate_each_step_ran_with(tiny_dir, data_file, tmp_path):
    """metrics.jsonl's `lr` for step s is the rate step s updated with (it was the next step's: during warm-up
    twice too high, and 0 on the last step of a linear schedule, which trained at lr/total)."""
    lr, steps, warm = 1e-3, 6, 3
    train(tiny_train_config(tiny_dir, data_file, tmp_path / "run", steps=steps, warmup_steps=warm,
                            schedule="linear", lr=lr), quiet=True)  # fmt: skip
    logged = [m["lr"] for m in read_metrics(tmp_path / "run")]
    want = [lr * lr_factor(s, steps, warm, "linear") for s in range(steps)]
    assert logged == pytest.approx(want, rel=1e-12)


def test_an_epoch_switched_policy_applies_from_the_first_step_of_that_epoch(tiny_dir, data_file, tmp_path, monkeypatch):
    """`all->response@1ep`: every step that reads epoch 1's data uses `response`. The policy was chosen
    from the position before the step's micro-batches were taken, so the first step of epoch 1 (which
    starts at the end of epoch 0) still trained under `all`: the switch came one step late."""
    import deltatune.data.packing as packing

    used: list[str] = []
    collate = packing.collate

    def spy(rows, policy, **kw):
        used.append(str(policy))
        return collate(rows, policy, **kw)

    monkeypatch.setattr(packing, "collate", spy)
    cfg = tiny_train_config(
        tiny_dir, data_file, tmp_path / "run", steps=None, epochs=2, eval_fraction=0.0, policy="all->response@1ep"
    )
    result = train(cfg, quiet=True)
    epochs = [h["epoch"] for h in result.history]
    assert 0 in epochs and 1 in epochs
    assert used == ["all" if e == 0 else "response" for e in epochs]


class _Adapted:
    methods: list = []

    def __init__(self, version: str) -> None:
        self.version = version

    def save_adapter(self, path, *, base_model_name_or_path=None):
        from deltatune.fileio import atomic_dir

        with atomic_dir(path) as tmp:
            (tmp / "adapter_model.safetensors").write_text(self.version)
        return Path(path)


class _Tokenizer:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def save_pretrained(self, path):
        if self.fail:
            raise OSError("No space left on device")
        (Path(path) / "tokenizer.json").write_text("{}")


def test_best_and_final_are_replaced_whole_or_not_at_all(tmp_path):
    """The adapter was written atomically, then the tokenizer into the finished folder: a crash (or a full
    disk) in between left best/ or final/ with a new adapter and no tokenizer, which `generate --adapter`
    needs. Both now go into one temporary folder renamed into place."""
    best = tmp_path / "run" / "best"
    save_outputs(_Adapted("old"), best, _Tokenizer(), False, "base")
    with pytest.raises(OSError):
        save_outputs(_Adapted("new"), best, _Tokenizer(fail=True), False, "base")
    assert sorted(p.name for p in best.iterdir()) == ["adapter_model.safetensors", "tokenizer.json"]
    assert (best / "adapter_model.safetensors").read_text() == "old"
    assert [p.name for p in best.parent.iterdir()] == ["best"]  # no temporary folder left behind


def test_overwrite_removes_the_old_runs_snapshots(tiny_dir, data_file, tmp_path):
    """--overwrite removed the old run's entries but not snapshots/: `deltatune analyze` then read the old
    run's later snapshots as if they were this run's."""
    out = tmp_path / "run"
    train(tiny_train_config(tiny_dir, data_file, out, steps=3, snapshot_every=1), quiet=True)
    train(tiny_train_config(tiny_dir, data_file, out, steps=1, snapshot_every=1, overwrite=True), quiet=True)
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step-0000001"]


@pytest.mark.parametrize(
    "key, value",
    [("lr", float("inf")), ("epochs", float("inf")), ("weight_decay", float("inf")), ("betas", [0.9, 1.5])],
)
def test_non_finite_or_out_of_range_optimiser_values_are_one_line_naming_the_key(key, value):
    """`lr: inf` trained NaN weights into final/ without a word; `epochs: inf` and `betas: [0.9, 1.5]`
    crashed with a traceback (OverflowError, AdamW's ValueError) after the model had loaded."""
    with pytest.raises(ConfigError) as err:
        load_config(overrides={key: value})
    assert err.value.field == key
    assert "\n" not in str(err.value)


def test_fused_adamw_decays_matrices_only_as_the_plain_adamw_path():
    """fused_update: fused-adamw must be AdamW as the default path builds it: weight decay on matrices, none on
    biases and norms (it decayed every parameter)."""

    from deltatune.train.lomo import build_fused

    w, b = torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(3))
    opt = build_fused("fused-adamw", [w, b], lr=0.1, weight_decay=0.5)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay == {id(w): 0.5, id(b): 0.0}
    w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
    for p, group in opt._params():
        opt._update(p, group)
    assert torch.equal(b, torch.ones(3)) and torch.allclose(w, torch.full((3, 2), 1 - 0.1 * 0.5))


def test_train_takes_prompt_completion_records_by_name_and_the_raw_template(tiny_dir, tmp_path):
    """`--format prompt` (the name data.md and preview use) was refused by train's config, whose own name
    `prompt-completion` the reader refused in turn; `template: raw` worked in preview, stats and eval but not here."""
    data = tmp_path / "pc.jsonl"
    rows = [{"prompt": f"{a} plus {b} is", "completion": f" {a + b}."} for a in range(6) for b in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_config(overrides={"data_format": "prompt-completion"}).data_format == "prompt"  # older runs resume
    for name in ("prompt", "prompt-completion"):
        out = tmp_path / name
        cfg = tiny_train_config(tiny_dir, data, out, data_format=name, template="raw", steps=2)
        train(cfg, quiet=True)
        assert (out / "final" / "adapter_config.json").exists()
        assert "data_format: prompt\n" in (out / "config.yaml").read_text()
        assert "template: raw\n" in (out / "config.yaml").read_text()
