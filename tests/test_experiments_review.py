"""Review of `deltatune experiment memorize` and `upcycle`: bad options, seeds, quick-mode options, folders."""

import json

import pytest

from deltatune.cli import main


@pytest.mark.parametrize("experts", ["4,x", "4,4", "1", "0", "", "-2"])
def test_upcycle_bad_experts_is_one_line_error_and_leaves_no_folder(tmp_path, capsys, experts):
    out = tmp_path / "exp"
    assert main(["experiment", "upcycle", "--quick", "--out", str(out), "--quiet", "--experts", experts]) == 2
    err = capsys.readouterr().err
    assert "--experts" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("lr", ["inf", "nan", "0"])
def test_upcycle_lr_that_is_no_positive_number_is_one_line_and_leaves_no_folder(tmp_path, capsys, lr):
    """inf passed the check (not inf > 0 is false) and reached the first run."""
    out = tmp_path / "exp"
    assert main(["experiment", "upcycle", "--quick", "--out", str(out), "--quiet", "--lr", lr]) == 2
    assert "--lr must be a positive number" in capsys.readouterr().err and not out.exists()


def test_upcycle_missing_gsm8k_is_one_line_error(tmp_path, capsys, monkeypatch):
    from deltatune.experiments import upcycle

    monkeypatch.setenv("DELTATUNE_DATA", str(tmp_path))  # a data root without gsm8k/
    with pytest.raises(Exception) as info:
        upcycle._records(False, 4)
    from deltatune.errors import UserError

    assert isinstance(info.value, UserError) and "gsm8k" in str(info.value).lower()


def test_upcycle_trains_every_seed_it_reports(tmp_path):
    out = tmp_path / "exp"
    assert main(["experiment", "upcycle", "--quick", "--out", str(out), "--quiet", "--seeds", "2"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [0, 1]
    seeds = sorted({(r["model"], r["seed"]) for r in res["runs"].values()})
    assert seeds == [(m, s) for m in ("dense", "upcycled-e4", "upcycled-e8") for s in (0, 1)]
    for name in res["runs"]:
        cfg = (out / "runs" / name / "config.yaml").read_text()
        assert f"seed: {res['runs'][name]['seed']}" in cfg
    # per model: the held-out loss at each point is the mean over the seeds
    for model in ("dense", "upcycled-e4", "upcycled-e8"):
        per_seed = [res["curves"][n] for n, r in res["runs"].items() if r["model"] == model]
        mean = [sum(c[i][3] for c in per_seed) / 2 for i in range(len(per_seed[0]))]
        assert [c[3] for c in res["mean_curves"][model]] == pytest.approx(mean)


def test_upcycle_quick_honours_explicit_sizes(tmp_path):
    out = tmp_path / "exp"
    argv = ["experiment", "upcycle", "--quick", "--out", str(out), "--quiet", "--experts", "4"]
    argv += ["--points", "3", "--batch-size", "1", "--seq-len", "48"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert [c[0] for c in res["curves"]["dense"]] == [0, 1, 2, 3]
    cfg = (out / "runs" / "dense" / "config.yaml").read_text()
    assert "batch_size: 1\n" in cfg and "seq_len: 48\n" in cfg


def test_memorize_pairs_are_never_cut_by_the_row_length(monkeypatch):
    from deltatune.experiments.memorize import row_length

    assert row_length([77, 78]) == 96  # the default model: one pair a row, as before
    assert row_length([120, 131]) >= 131  # a tokenizer that spells UUIDs out: no value token cut off
    lengths = [30, 33]
    assert 33 <= row_length(lengths) < 2 * 30  # short pairs: still one pair a row (batch = pairs)


def test_a_users_folder_with_its_own_experiment_json_is_refused_not_overwritten(tmp_path):
    from deltatune.errors import UserError
    from deltatune.experiments.common import Context

    out = tmp_path / "mine"
    out.mkdir()
    (out / "experiment.json").write_text('{"name": "my sweep", "lr": [1, 2]}\n')
    (out / "notes.txt").write_text("keep me\n")
    with pytest.raises(UserError, match="not an experiment folder"):
        Context("memorize", out, quick=False, seeds=[0], quiet=True, model="unused")
    assert (out / "experiment.json").read_text() == '{"name": "my sweep", "lr": [1, 2]}\n'


def test_a_set_up_failure_of_another_experiment_is_still_retaken(tmp_path):
    from deltatune.experiments.common import Context

    out = tmp_path / "exp"
    Context("masking", out, quick=False, seeds=[0], quiet=True, model="unused")
    ctx = Context("memorize", out, quick=False, seeds=[0], quiet=True, model="unused")  # nothing trained there
    assert ctx.name == "memorize"


@pytest.mark.parametrize("threads", ["-1", "0"])
def test_bad_threads_is_one_line_error(tmp_path, capsys, threads):
    out = tmp_path / "exp"
    assert main(["experiment", "memorize", "--quick", "--out", str(out), "--quiet", "--threads", threads]) == 2
    err = capsys.readouterr().err
    assert "--threads must be at least 1" in err and not out.exists()


def test_memorize_high_rank_equal_to_8_is_one_line_error(tmp_path, capsys):
    out = tmp_path / "mem"
    argv = ["experiment", "memorize", "--quick", "--out", str(out), "--quiet", "--high-rank", "8"]
    assert main(argv) == 2
    assert "--high-rank" in capsys.readouterr().err and not out.exists()


def test_upcycle_measures_the_start_under_the_runs_autocast():
    """The later held-out points are measured inside the training step's autocast; the step-0 point was measured
    in plain fp32, so on a bf16 machine the curve's start was not comparable with the rest of it."""
    import torch

    from deltatune.experiments.upcycle import measure_start
    from deltatune.testing import tiny_model

    seen = []

    def measure(step, model):
        seen.append(torch.is_autocast_enabled("cpu"))
        return {"heldout_loss": 1.0}

    assert measure_start(measure, tiny_model(), "bf16") == {"heldout_loss": 1.0}
    measure_start(measure, tiny_model(), "fp32")
    assert seen == [True, False]
