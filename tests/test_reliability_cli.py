"""A table of bad inputs through the CLI (flags, configs, data, checkpoints, output paths). For each:
a non-zero exit, exactly one line on stderr naming the file or field, no traceback, and nothing
created or changed on disk (every folder involved is snapshotted before and after)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from reliability_helpers import cli, snapshot, train_args


@pytest.fixture(scope="module")
def world(tiny_dir, data_file, tmp_path_factory) -> dict[str, Path]:
    """A tiny model, good and bad data and configs, a finished run with checkpoints, a broken adapter."""
    from deltatune.cli import main

    root = tmp_path_factory.mktemp("world")
    (root / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 3}\n')
    (root / "dir.jsonl").mkdir()
    (root / "empty.jsonl").write_text("")
    (root / "bad.yaml").write_text("lr: 1e-4\nrank: [1\n")
    (root / "unknown.yaml").write_text("rnak: 8\n")
    (root / "users-folder").mkdir()
    (root / "users-folder" / "notes.txt").write_text("mine")
    run = root / "run"
    assert main([str(a) for a in train_args(tiny_dir, data_file, run, "--save-every", "1", steps=2)]) == 0
    broken = root / "broken-adapter"
    shutil.copytree(run / "final", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    return {"root": root, "tiny": tiny_dir, "data": data_file, "run": run, "broken": broken}


def _train(*extra: str, steps: int = 3) -> list[str]:
    return train_args("{tiny}", "{data}", "{root}/out", *extra, steps=steps)


def _eval(*extra: str) -> list[str]:
    return ["eval", "--model", "{tiny}", "--task", "file:{data}", *extra]


# (id, argv with {placeholders}, text the one line must contain)
CASES = [
    # flags
    ("device-tpu", _train("--device", "tpu"), "device"),
    ("device-cuda-without-cuda", _train("--device", "cuda:99"), "CUDA"),  # no CUDA, or no 100th device
    ("set-invalid-yaml", _train("--set", "lr=[1"), "lr"),
    ("set-not-key-value", _train("--set", "lr"), "key=value"),
    ("map-not-a-pair", _train("--map", "question=instruction,answer"), "'answer' is not of the form"),
    ("set-text-value-not-allowed", _train("--set", "fused_norms=maybe"), "fused_norms"),
    ("unknown-key", _train("--set", "rnak=8"), "did you mean 'rank'"),
    ("unknown-method", _train("--method", "lroa"), "lroa"),
    ("unknown-policy", _train("--policy", "responce"), "responce"),
    ("switch-after-last-step", _train("--policy", "response->all@3"), "second phase"),
    ("misspelt-target-in-list", _train("--targets", "q_proj,v_prj"), "v_prj"),
    ("bad-target-pattern", _train("--targets", "q_proj("), "targets"),
    ("rank-zero", _train("--rank", "0"), "rank"),
    ("flag-not-a-number", _train("--rank", "eight"), "rank"),
    ("resume-without-run", _train("--resume"), "nothing to resume"),
    (
        "generate-negative-tokens",
        ["generate", "--model", "{tiny}", "--prompt", "x", "--max-new-tokens", "-1"],
        "max-new-tokens",
    ),
    (
        "generate-negative-temperature",
        ["generate", "--model", "{tiny}", "--prompt", "x", "--temperature", "-1"],
        "temperature",
    ),
    ("preview-limit-zero", ["preview", "--data", "{data}", "--tokenizer", "tiny", "--limit", "0"], "--limit"),
    ("preview-limit-negative", ["preview", "--data", "{data}", "--tokenizer", "tiny", "--limit", "-1"], "--limit"),
    (
        "stats-batch-size-zero",
        ["stats", "--data", "{data}", "--tokenizer", "tiny", "--batch-size", "0"],
        "--batch-size",
    ),
    ("eval-out-is-a-folder", _eval("--out", "{root}/users-folder"), "users-folder"),
    ("eval-out-onto-its-data", _eval("--out", "{data}"), "being read"),
    (
        "eval-predictions-onto-the-model-config",
        _eval("--predictions", "{tiny}/config.json", "--overwrite"),
        "model being read",
    ),
    ("eval-out-onto-users-file", _eval("--out", "{root}/users-folder/notes.txt"), "--overwrite"),
    (
        "eval-out-and-predictions-the-same",
        _eval("--out", "{root}/r.json", "--predictions", "{root}/r.json"),
        "predictions",
    ),
    ("experiment-steps-zero", ["experiment", "memorize", "--quick", "--out", "{root}/e", "--steps", "0"], "--steps"),
    ("experiment-rank-zero", ["experiment", "memorize", "--quick", "--out", "{root}/e", "--high-rank", "0"], "rank"),
    (
        "experiment-sizes-not-numbers",
        ["experiment", "masking", "--quick", "--out", "{root}/e", "--sizes", "50,x"],
        "--sizes",
    ),
    (  # the two-phase arm switched at step 0: refused when that run started, after 8 runs had trained
        "experiment-masking-one-step",
        ["experiment", "masking", "--quick", "--out", "{root}/e", "--steps", "1"],
        "--steps must be at least 2",
    ),
    (  # cut down to the pool silently and reported under the size asked for
        "experiment-masking-size-above-the-data",
        ["experiment", "masking", "--quick", "--out", "{root}/e", "--sizes", "4,100000"],
        "training records",
    ),
    (
        "experiment-masking-heldout-above-the-data",
        ["experiment", "masking", "--quick", "--out", "{root}/e", "--heldout", "100000"],
        "held-out records",
    ),
    (  # refused before the experiment claims its folder (masking reads its data to check --sizes)
        "experiment-data-root-missing",
        ["experiment", "masking", "--quick", "--out", "{root}/e", "--data-root", "{root}/no-data"],
        "no-data",
    ),
    ("merge-dtype-unknown", ["merge", "--adapter", "{run}/final", "--out", "{root}/m", "--dtype", "fp7"], "dtype"),
    ("merge-unreadable-safetensors", ["merge", "--adapter", "{broken}", "--out", "{root}/m"], "safetensors"),
    # configs
    ("config-invalid-yaml", ["train", "{root}/bad.yaml", "--output", "{root}/out"], "bad.yaml:"),
    ("config-unknown-key", ["train", "{root}/unknown.yaml", "--output", "{root}/out"], "unknown.yaml"),
    ("config-missing", ["train", "{root}/nope.yaml", "--output", "{root}/out"], "nope.yaml"),
    ("config-is-a-folder", ["train", "{root}/dir.jsonl", "--output", "{root}/out"], "dir.jsonl"),
    # data
    ("data-bad-record", train_args("{tiny}", "{root}/bad.jsonl", "{root}/out"), "bad.jsonl:2"),
    ("data-empty", train_args("{tiny}", "{root}/empty.jsonl", "{root}/out"), "empty.jsonl: no records"),
    ("data-missing", train_args("{tiny}", "{root}/nope.jsonl", "{root}/out"), "nope.jsonl"),
    ("data-is-a-folder", train_args("{tiny}", "{root}/dir.jsonl", "{root}/out"), "dir.jsonl"),
    ("preview-bad-record", ["preview", "--data", "{root}/bad.jsonl", "--tokenizer", "tiny"], "bad.jsonl:2"),
    # checkpoints: resume must be the same run
    ("resume-other-lr", train_args("{tiny}", "{data}", "{run}", "--resume", "--lr", "1e-2"), "lr"),
    ("resume-other-rank", train_args("{tiny}", "{data}", "{run}", "--resume", "--rank", "8"), "rank"),
    ("resume-other-data", train_args("{tiny}", "{root}/bad.jsonl", "{run}", "--resume"), "data"),
    ("resume-and-overwrite", train_args("{tiny}", "{data}", "{run}", "--resume", "--overwrite"), "--overwrite"),
    # output paths
    ("train-into-a-run", train_args("{tiny}", "{data}", "{run}"), "already holds a run"),
    ("train-into-the-model", train_args("{tiny}", "{data}", "{tiny}"), "model being read"),
    ("train-output-under-a-file", train_args("{tiny}", "{data}", "{data}/run"), "train.jsonl"),
    ("merge-into-users-folder", ["merge", "--adapter", "{run}/final", "--out", "{root}/users-folder"], "--overwrite"),
    ("merge-into-the-run", ["merge", "--adapter", "{run}/final", "--out", "{run}", "--overwrite"], "being read"),
    (
        "merge-into-the-model",
        ["merge", "--adapter", "{run}/final", "--model", "{tiny}", "--out", "{tiny}", "--overwrite"],
        "being read",
    ),
    ("export-onto-the-data", ["export", "--model", "{tiny}", "--out", "{data}"], "--overwrite"),
    ("export-under-a-file", ["export", "--model", "{tiny}", "--out", "{data}/model"], "not a folder"),
]


@pytest.mark.parametrize("argv, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(capsys, world, argv, needle):
    args = [a.format(**world) for a in argv]
    roots = [world["root"], world["tiny"], world["data"].parent]
    before = snapshot(*roots)
    rc, _, err = cli(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc != 0, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    assert snapshot(*roots) == before


def test_the_table_covers_every_kind_of_input():
    kinds = {c[0].split("-")[0] for c in CASES}
    assert {"config", "data", "resume", "merge", "export", "train", "generate", "preview", "stats", "eval"} <= kinds
    assert "experiment" in kinds
    assert len({c[0] for c in CASES}) == len(CASES)


def test_bom_is_accepted_in_json_and_jsonl(tmp_path, tiny_tok):
    from deltatune.data.pipeline import prepare_dataset

    record = {"instruction": "What is 1 + 1?", "output": "2"}
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(record).encode() + b"\n")
    (tmp_path / "a.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([record]).encode())
    for name in ("a.jsonl", "a.json"):
        assert prepare_dataset(tmp_path / name, tiny_tok).report.kept == 1, name
