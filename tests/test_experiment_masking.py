"""`deltatune experiment masking` in --quick mode, and the measured-result line of `deltatune stats`."""

import json
import math
import os
from pathlib import Path

from deltatune.cli import main
from deltatune.experiments.recorded import masking_advice

REPO = Path(__file__).resolve().parent.parent


def _data_root() -> Path:
    root = Path(os.environ.get("DELTATUNE_DATA") or REPO.parent / "shared" / "data")
    assert (root / "gsm8k").is_dir() and (root / "mmlu").is_dir(), f"{root} lacks gsm8k/ and mmlu/ (../shared/data)"
    return root


def test_quick_masking_trains_every_run_and_writes_results(tmp_path):
    out = tmp_path / "mask"
    assert (
        main(
            [
                "experiment",
                "masking",
                "--quick",
                "--out",
                str(out),
                "--seeds",
                "1",
                "--sizes",
                "2,4",
                "--steps",
                "2",
                "--data-root",
                str(_data_root()),
                "--quiet",
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    assert res["sizes"] == [2, 4] and res["seeds"] == [0]
    assert res["ratios"]["mmlu"]["ratio"] > 3 * res["ratios"]["gsm8k"]["ratio"]  # short vs long responses
    runs = list(res["runs"].values())
    for run in runs:
        assert run["steps"] == 2 and len(run["losses"]) == 2 and all(math.isfinite(x) for x in run["losses"])
        m = run["measured"]["2"]
        assert math.isfinite(m["heldout_response_loss"]) and 0 <= m["exact_match"] <= 1
        assert m["gap"] == m["heldout_response_loss"] - m["train_response_loss"]
    arms = {(r["dataset"], r["size"], r["policy"], r["template"], r["loss_reduction"]) for r in runs}
    for ds in ("gsm8k", "mmlu"):
        for size in (2, 4):
            assert {(ds, size, p, "chatml", "token") for p in ("response", "instruction")} <= arms
        assert {(ds, 2, p, "chatml", "token") for p in ("all", "weighted:0.1", "two-phase")} <= arms
        assert {(ds, 2, p, "chatml", "example") for p in ("response", "instruction")} <= arms
    assert {("mmlu", 2, p, "alpaca", "token") for p in ("response", "instruction", "no-boilerplate")} <= arms
    assert len(runs) == len(arms) == 21
    two_phase = next(r for r in res["runs"] if "two-phase" in r)
    assert "instruction->response@1" in (out / "runs" / two_phase / "config.yaml").read_text()
    assert {(g["dataset"], g["size"]) for g in res["gains"]} == {(d, s) for d in ("gsm8k", "mmlu") for s in (2, 4)}
    assert (out / "masking_gain.png").read_bytes()[:4] == b"\x89PNG"
    assert "| mmlu | 2 | no-boilerplate | alpaca | token |" in (out / "results.md").read_text()
    recorded = json.loads((out / "recorded.json").read_text())
    assert "Measured by this project" in masking_advice(10.0, 3, recorded)


def test_stats_advice_quotes_the_recorded_result_or_says_none():
    recorded = {
        "model": "M",
        "by_dataset": {
            "gsm8k": {
                "ratio": 0.5,
                "sizes": {"50": {"loss_diff": 0.02, "em_diff": 0.0, "seeds": 2, "loss_diff_spread": 0.01}},
            },
            "mmlu": {
                "ratio": 12.0,
                "sizes": {
                    "50": {"loss_diff": -0.1, "em_diff": 0.05, "seeds": 2, "loss_diff_spread": 0.02},
                    "800": {"loss_diff": -0.01, "em_diff": 0.0, "seeds": 2, "loss_diff_spread": 0.03},
                },
            },
        },
    }
    line = masking_advice(20.0, 40, recorded)  # nearest ratio: mmlu; nearest size: 50
    assert "mmlu (ratio 12.00), 50 training examples" in line and "-0.100" in line and "+5.0 points" in line
    assert "loss on instructions did better there" in line  # -0.100, beyond the 0.02 spread
    assert "800 training examples" in masking_advice(8.0, 5000, recorded)
    assert "no difference beyond the spread" in masking_advice(8.0, 5000, recorded)  # -0.01 within 0.03
    assert "gsm8k" in masking_advice(0.3, 50, recorded)
    assert "loss on instructions did worse there" in masking_advice(0.3, 50, recorded)  # +0.02 beyond 0.01
    assert "not recorded yet" in masking_advice(1.0, 10, {})


def test_stats_advice_ends_with_the_project_measurement_line():
    from deltatune.data.stats import advise

    base = {
        "tokens": {"instruction": {"mean": 0.0}, "response": {"mean": 0.0}},
        "would_truncate": 0,
        "max_len": 1,
        "policies": {"instruction": {"boilerplate_share": 0.0}},
        "padding": {},
        "batch_size": 8,
    }
    lines = advise({**base, "ratio_instruction_to_response": 20.0, "examples": 2000}, "chatml")
    assert lines[-1] == masking_advice(20.0, 2000)  # recorded result if committed, else the placeholder
