"""`deltatune experiment upcycle --quick`: the whole pipeline on the tiny model, and resume."""

import json

from deltatune.cli import main


def test_quick_upcycle_experiment_reports_costs_and_curves(tmp_path):
    out = tmp_path / "exp"
    assert main(["experiment", "upcycle", "--quick", "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    start = res["start"]
    assert set(res["runs"]) == {"dense", "upcycled-e4", "upcycled-e8"}
    mlp, hidden = 3 * 64 * 128, 64  # tiny model: one MLP; every other layer of 2 = layer 1 only
    for e in (4, 8):
        s = start[f"upcycled-e{e}"]
        assert s["params"] - start["dense"]["params"] == (e - 1) * mlp + e * hidden
        # top-2: one more MLP per token in the MoE layer, plus the router
        assert s["fwd_flops_per_token"] - start["dense"]["fwd_flops_per_token"] == 2 * (mlp + e * hidden)
    for name, curve in res["curves"].items():
        assert [c[0] for c in curve] == [0, 2, 3]  # before training, then the measured steps
        assert all(c[2] > 0 for c in curve[1:]) and curve[0][3] == start[name]["heldout_loss"]
    assert "Held-out loss by step" in (out / "results.md").read_text()
    assert (out / "heldout_loss.png").exists()
    assert json.loads((out / "runs" / "upcycled-e8" / "done.json").read_text())["steps"] == 3
    # trained in the template its held-out loss is measured in (auto became the model's own template, with a
    # system prompt where SmolLM2's adds one)
    for run in ("dense", "upcycled-e4", "upcycled-e8"):
        assert "template: chatml" in (out / "runs" / run / "config.yaml").read_text().splitlines()
    # a second invocation resumes: every run is done, nothing trains again
    before = (out / "runs" / "dense" / "metrics.jsonl").read_text()
    assert main(["experiment", "upcycle", "--quick", "--out", str(out), "--quiet"]) == 0
    assert (out / "runs" / "dense" / "metrics.jsonl").read_text() == before
