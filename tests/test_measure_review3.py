"""Review 3 of the measurement area: experiment folders retaken after a failed set-up, base scores, plans."""

from __future__ import annotations

import json

import pytest

from deltatune.cli import main


def _interrupt_before_any_run(monkeypatch) -> None:
    """Make the experiment stop (Ctrl-C) once its set-up is done, before its first run trains."""
    from deltatune.experiments.common import Context

    def interrupted(self, runs, follow=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(Context, "run_all", interrupted)


def test_upcycle_retaken_after_a_failed_set_up_never_reuses_models_or_start_losses_of_other_settings(
    tmp_path, monkeypatch
):
    """An upcycle folder whose set-up stopped (upcycled models built, start losses measured, no run yet) is
    retaken by a command with other settings. It reused `models/upcycled-eN` and `start.json` as they were:
    `--normalize` reported renormalised models that were the raw-softmax ones (start loss 6.2897, not the dense
    6.2916 that renormalised top-2 starts at), and `--eval-examples` a start loss on other examples."""
    out = tmp_path / "exp"
    with monkeypatch.context() as m:
        _interrupt_before_any_run(m)
        assert main(["experiment", "upcycle", "--quick", "--out", str(out), "--quiet", "--steps", "2"]) == 130
    assert (out / "models" / "upcycled-e4" / "upcycle.json").exists() and not (out / "runs").exists()

    args = ["experiment", "upcycle", "--quick", "--out", str(out), "--quiet", "--steps", "2", "--normalize"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["normalize"] is True
    for e in (4, 8):
        spec = json.loads((out / "models" / f"upcycled-e{e}" / "upcycle.json").read_text())["spec"]
        assert spec["normalize"] is True and spec["experts"] == e
        # renormalised top-2 over copies of one MLP is the dense model: the same start loss
        assert res["start"][f"upcycled-e{e}"]["heldout_loss"] == pytest.approx(res["start"]["dense"]["heldout_loss"])

    # the same settings again: a resume, nothing rebuilt or measured again
    stamp = (out / "models" / "upcycled-e4" / "upcycle.json").stat().st_mtime_ns
    start = (out / "start.json").read_text()
    assert main(args) == 0
    assert (out / "models" / "upcycled-e4" / "upcycle.json").stat().st_mtime_ns == stamp
    assert (out / "start.json").read_text() == start


def test_learn_forget_never_reuses_base_scores_of_another_precision_or_model(tmp_path):
    """base.json was checked for its sizes only: a folder retaken after a failed set-up under `--precision bf16`
    (the base scored with bf16 weights under bf16 autocast) gave an fp32 experiment the bf16 base's scores, and
    one under another `--model` that model's scores. They are measured again; the same setup reads them back."""
    from deltatune.experiments import learn_forget as lf
    from deltatune.experiments.common import Context

    out, measured = tmp_path / "exp", []

    class FakeMeasures:
        sizes = {"gsm8k": 40}

        def __init__(self, precision: str) -> None:
            self.precision = precision

        def missing(self, scores):
            return []

        def base_scores(self, frozen, tasks=None):
            measured.append((self.precision, model))
            return {"n": {}, "eval_seconds": {}, "gsm8k": 0.5, "by": [self.precision, model]}

    def base(precision: str) -> list:
        settings = {"precision": precision, **({"model": model} if model else {})}
        ctx = Context("learn-forget", out, quick=False, seeds=[0], settings=settings, model=model, quiet=True)
        return lf._base(ctx, FakeMeasures(precision), "base.json", True)["by"]

    model = None
    assert base("bf16") == ["bf16", None]
    assert base("fp32") == ["fp32", None]
    assert base("fp32") == ["fp32", None]  # read back
    model = "other-model"
    assert base("fp32") == ["fp32", "other-model"]
    assert measured == [("bf16", None), ("fp32", None), ("fp32", "other-model")]


@pytest.mark.parametrize(
    "experiment, option",
    [("masking", ["--sizes", "2,2"]), ("learn-forget", ["--methods", "lora-r8,lora-r8", "--lrs", "1"])],
)
def test_a_size_or_method_named_twice_is_one_line_before_any_work(tmp_path, capsys, experiment, option):
    """`masking --sizes 2,2` and `learn-forget --methods lora-r8,lora-r8` made the same runs twice: a
    ValueError traceback from run_all (learn-forget after scoring the base model, minutes in full mode), exit 1,
    and the claimed folder left behind."""
    out = tmp_path / "exp"
    assert main(["experiment", experiment, "--quick", "--out", str(out), "--quiet", *option]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "twice" in err
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--seq-len", "--batch-size"])
def test_plan_names_the_count_that_is_not_positive(capsys, flag):
    """`plan --seq-len 0` was blamed on field 'batch-size'."""
    assert main(["plan", "--model", "smollm2-135m", flag, "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"field '{flag[2:]}'" in err, err
