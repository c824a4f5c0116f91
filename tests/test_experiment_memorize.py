"""`deltatune experiment memorize`: the metrics on hand examples, the data, and the whole --quick pipeline."""

import json

from deltatune.cli import main
from deltatune.experiments.memorize import char_accuracy, memorization_scores, uuid_pairs


def test_char_accuracy_hand_examples():
    assert char_accuracy("abcd", "abcd") == 1.0
    assert char_accuracy("abcf", "abcd") == 0.75
    assert char_accuracy("ab", "abcd") == 0.5  # missing characters count as wrong
    assert char_accuracy("abcdXYZ", "abcd") == 1.0  # positions past the reference are not scored
    assert char_accuracy("xabc", "abcd") == 0.0  # position by position: a shift is all wrong
    scores = memorization_scores(["abcd", "abzz"], ["abcd", "abcd"])
    assert scores == {"char_acc": 0.75, "exact": 0.5}


def test_uuid_pairs_are_seeded_unique_version4():
    pairs = uuid_pairs(50, seed=7)
    assert pairs == uuid_pairs(50, seed=7) and pairs != uuid_pairs(50, seed=8)
    keys = [k for k, _ in pairs]
    assert len(set(keys)) == 50
    for k, v in pairs:
        for u in (k, v):
            assert len(u) == 36 and u[14] == "4" and u[8] == u[13] == u[18] == u[23] == "-"


def test_quick_memorize_trains_every_run_and_writes_results(tmp_path):
    out = tmp_path / "mem"
    assert (
        main(
            [
                "experiment",
                "memorize",
                "--quick",
                "--out",
                str(out),
                "--seeds",
                "1",
                "--pairs",
                "8",
                "--steps",
                "4",
                "--quiet",
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    assert res["experiment"] == "memorize" and res["seeds"] == [0] and res["points"] == [1, 2, 3, 4]
    assert res["machine"]["cpu"] and res["wall_s"] > 0
    arms = ["full", "lora-r8", "mora-r8", "lora-r16", "mora-r16"]
    assert list(res["summary"]) == arms
    for name, run in res["runs"].items():
        assert run["steps"] == 4 and len(run["losses"]) == 4 and run["tokens_per_s"] > 0
        assert sorted(run["measured"], key=int) == ["1", "2", "3", "4"]
        assert all(0 <= m["char_acc"] <= 1 for m in run["measured"].values())
        assert (out / "runs" / name / "final").is_dir() and (out / "runs" / name / "done.json").exists()
    p = {a: res["summary"][a]["trainable_params"] for a in arms}
    assert abs(p["mora-r8"] - p["lora-r8"]) / p["lora-r8"] < 0.05  # MoRA at LoRA r=8's parameter count
    assert abs(p["mora-r16"] - p["lora-r16"]) / p["lora-r16"] < 0.05
    assert p["full"] > p["lora-r16"] > p["lora-r8"]
    md = (out / "results.md").read_text()
    assert "| lora-r8 |" in md and "step 4" in md and "Paper" in md
    assert (out / "memorize.png").read_bytes()[:4] == b"\x89PNG"
    # the same command again finds every run done and trains nothing
    assert (
        main(
            [
                "experiment",
                "memorize",
                "--quick",
                "--out",
                str(out),
                "--seeds",
                "1",
                "--pairs",
                "8",
                "--steps",
                "4",
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads((out / "results.json").read_text())["runs"] == res["runs"]
