"""`deltatune experiment learn-forget --quick`: the whole pipeline on the tiny model, its numbers checked
against their definitions, the rate picked on validation loss, and a resumed run that trains nothing."""

from __future__ import annotations

import json

import pytest


def test_learn_forget_quick_end_to_end_and_resume(tmp_path, shared_data):
    from deltatune.cli import main

    out = tmp_path / "lf"
    args = [
        "experiment",
        "learn-forget",
        "--quick",
        "--seeds",
        "2",
        "--lrs",
        "2",
        "--methods",
        "full,lora-r8",
        "--threads",
        "1",
        "--quiet",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    base, runs = res["base"], res["runs"]
    tgt, mmlu, bbh = (
        "gsm8k",
        next(k for k in base if k.startswith("mmlu:")),
        next(k for k in base if k.startswith("bbh:")),
    )
    # 2 methods x 2 rates on seed 0, then the picked rate again on seed 1
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted(
        [("full", 0)] * 2 + [("lora-r8", 0)] * 2 + [("full", 1), ("lora-r8", 1)]
    )
    # reported in the order asked for (methods, then rate, then seed), whatever order they trained in
    # (TRAIN_ORDER, each seed-1 repeat as soon as its method's sweep was done)
    assert [(r["method"], r["lr"], r["seed"]) for r in runs] == sorted(
        [(r["method"], r["lr"], r["seed"]) for r in runs], key=lambda k: (["full", "lora-r8"].index(k[0]), k[1], k[2])
    )
    assert list(res["picked_lr"]) == ["full", "lora-r8"]
    for method in ("full", "lora-r8"):
        sweep = [r for r in runs if r["method"] == method and r["seed"] == 0]
        best = min(sweep, key=lambda r: r["val_loss"])
        assert res["picked_lr"][method] == best["lr"]  # picked on validation loss, never on test scores
        assert [r["lr"] for r in runs if r["method"] == method and r["seed"] == 1] == [best["lr"]]
    for r in runs:  # learning and forgetting are fractions from the definitions; the loss is never mixed in
        sc = r["scores"]
        assert r["learning"] == pytest.approx(sc[tgt] - base[tgt])
        assert r["forgetting"] == pytest.approx(((base[mmlu] - sc[mmlu]) + (base[bbh] - sc[bbh])) / 2)
        assert "selfinstruct_loss" in sc and sc["n"][tgt] == 2
        # learning in nats: the fall of the loss on the scored GSM8K test problems' reference solutions
        assert r["learning_nats"] == pytest.approx(base["gsm8k_test_loss"] - sc["gsm8k_test_loss"])
    lines = (out / "data" / "gsm8k_test_answers.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["output"].rstrip().split("\n")[-1].startswith("#### ")
    lora = next(r for r in runs if r["method"] == "lora-r8")
    assert all(1 <= s["rank90_max"] <= 8 for s in lora["spectrum"])  # a rank-8 update needs at most rank 8
    full = next(r for r in runs if r["method"] == "full")
    assert {s["type"] for s in full["spectrum"]} >= {"q_proj", "down_proj"}
    md = (out / "results.md").read_text()
    assert "## Held-out losses: GSM8K test solutions and self-instruct references (nats per token" in md
    assert "## Headline" in md
    # the loss headline: each method's validation loss and self-instruct change, averaged over its two seeds
    from deltatune.experiments.common import markdown_table

    for method in ("full", "lora-r8"):
        sel = [r for r in runs if r["method"] == method and r["lr"] == res["picked_lr"][method]]
        val = sum(r["val_loss"] for r in sel) / 2
        test = sum(-r["learning_nats"] for r in sel) / 2
        change = sum(r["scores"]["selfinstruct_loss"] - r["base_selfinstruct_loss"] for r in sel) / 2
        cells = markdown_table(["v", "t", "c"], [[val, test, change]]).splitlines()[-1].strip("| ").split(" | ")
        row = next(line for line in md.split("## Headline losses")[1].splitlines() if line.startswith(f"| {method} |"))
        assert [row.split(" | ")[i] for i in (3, 5, 7)] == cells
    for png in ("learn_forget.png", "learn_forget_loss.png", "spectrum.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # the same command again: every run has its done marker, nothing trains, the results are the same runs
    marker = out / "runs" / lora["name"] / "done.json"
    before = marker.stat().st_mtime_ns
    assert main(args) == 0
    again = json.loads((out / "results.json").read_text())
    assert marker.stat().st_mtime_ns == before
    assert [(r["name"], r["learning"]) for r in again["runs"]] == [(r["name"], r["learning"]) for r in runs]


def test_seeds_and_methods_can_be_added_to_a_finished_experiment(tmp_path, shared_data, capsys):
    """Seeds and methods only choose runs: a restart with more of them trains just the new runs and keeps the
    old ones; an option that changes how runs are done (the rate grid) is still refused."""
    from deltatune.cli import main

    out = tmp_path / "lf"

    def args(seeds, methods, lrs="1"):
        return ["experiment", "learn-forget", "--quick", "--seeds", seeds, "--lrs", lrs, "--methods", methods]

    common = ["--threads", "1", "--quiet", "--out", str(out)]
    assert main([*args("1", "lora-r8"), *common]) == 0
    marker = out / "runs" / "lora-r8-lr0.0001-s0" / "done.json"
    before = marker.stat().st_mtime_ns
    assert main([*args("2", "lora-r8,dora-r8"), *common]) == 0
    assert marker.stat().st_mtime_ns == before  # kept, not trained again
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted(r["name"] for r in runs) == [
        "dora-r8-lr0.0001-s0",
        "dora-r8-lr0.0001-s1",
        "lora-r8-lr0.0001-s0",
        "lora-r8-lr0.0001-s1",
    ]
    manifest = json.loads((out / "experiment.json").read_text())["settings"]
    assert (manifest["seeds"], manifest["methods"]) == ([0, 1], "lora-r8,dora-r8")
    # a narrower invocation reports its runs; the wider report is kept under reports/, not replaced (it was)
    full = json.loads((out / "results.json").read_text())
    plots = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert sorted(plots) == ["learn_forget.png", "learn_forget_loss.png", "spectrum.png"]
    assert main([*args("1", "lora-r8"), *common]) == 0
    narrow = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in narrow["runs"]] == ["lora-r8-lr0.0001-s0"]
    kept = out / "reports" / full["finished"].replace(":", "")
    assert json.loads((kept / "results.json").read_text()) == full
    assert (kept / "results.md").exists()
    # the earlier report's own plots are kept (the new ones had replaced them before the archive moved them), and
    # the new results.md has its plots beside it (none were left)
    assert {p.name: p.read_bytes() for p in kept.glob("*.png")} == plots
    assert sorted(p.name for p in out.glob("*.png")) == sorted(plots)
    assert all((out / name).read_bytes() != plots[name] for name in ("learn_forget.png", "learn_forget_loss.png"))
    assert narrow["wall_s_all_invocations"] == pytest.approx(full["wall_s_all_invocations"] + narrow["wall_s"], abs=0.2)
    capsys.readouterr()
    assert main([*args("2", "lora-r8,dora-r8", lrs="2"), *common]) != 0
    assert "same options" in capsys.readouterr().err


def test_every_method_has_its_place_in_the_training_order():
    from deltatune.experiments.learn_forget import METHODS, TRAIN_ORDER

    assert sorted(TRAIN_ORDER) == sorted(METHODS)


def test_learn_forget_rejects_an_unknown_method(tmp_path, capsys):
    from deltatune.cli import main

    rc = main(["experiment", "learn-forget", "--quick", "--methods", "lora-r9", "--out", str(tmp_path / "o")])
    assert rc == 2 and "unknown method 'lora-r9'" in capsys.readouterr().err


def test_learn_forget_in_bf16_measures_each_run_against_its_own_start(tmp_path, shared_data):
    """bf16: adapter runs start from bf16 weights, full finetuning from fp32 weights; each is scored under
    the same autocast and its learning and forgetting are taken against that start."""
    from deltatune.cli import main

    out = tmp_path / "lf16"
    args = ["experiment", "learn-forget", "--quick", "--seeds", "1", "--lrs", "1", "--methods", "full,lora-r8"]
    assert main([*args, "--precision", "bf16", "--threads", "1", "--quiet", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["precision"] == "bf16"
    assert res["base"] == json.loads((out / "base.json").read_text())
    assert res["base_full_finetuning"] == json.loads((out / "base-full.json").read_text())
    mmlu = next(k for k in res["base"] if k.startswith("mmlu:"))
    bbh = next(k for k in res["base"] if k.startswith("bbh:"))
    for r in res["runs"]:
        own = res["base_full_finetuning"] if r["method"] == "full" else res["base"]
        sc = r["scores"]
        assert r["learning"] == pytest.approx(sc["gsm8k"] - own["gsm8k"])
        assert r["forgetting"] == pytest.approx(((own[mmlu] - sc[mmlu]) + (own[bbh] - sc[bbh])) / 2)
        assert r["base_selfinstruct_loss"] == own["selfinstruct_loss"]
        config = (out / "runs" / r["name"] / "config.yaml").read_text()
        assert "precision: bf16" in config
    # the two starts differ (bf16 rounding of every weight), so the held-out loss tells them apart
    assert res["base"]["selfinstruct_loss"] != res["base_full_finetuning"]["selfinstruct_loss"]
    assert "fp32 weights (full finetuning)" in (out / "results.md").read_text()


def _drop_measure(path, key: str) -> float:
    """Remove one score from a done.json or base.json (as written before the measure existed)."""
    doc = json.loads(path.read_text())
    scores = doc if "measured" not in doc else doc["measured"][str(doc["steps"])]["scores"]
    value = scores.pop(key)
    path.write_text(json.dumps(doc))
    return value


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_measure_added_later_is_taken_from_the_saved_weights(tmp_path, shared_data, precision):
    """Runs and bases measured before the GSM8K test loss existed get it on resume, from their final
    weights, equal to what the run measured in-process: nothing is trained again. In bf16 the adapter is
    loaded as trained (fp32 tensors over the bf16 base) and full finetuning from its fp32 weights."""
    from deltatune.cli import main

    out = tmp_path / "lf"
    args = ["experiment", "learn-forget", "--quick", "--seeds", "1", "--lrs", "1", "--methods", "full,lora-r8"]
    args += ["--precision", precision, "--threads", "1", "--quiet", "--out", str(out)]
    assert main(args) == 0
    first = json.loads((out / "results.json").read_text())
    dropped = {
        name: _drop_measure(out / "runs" / name / "done.json", "gsm8k_test_loss")
        for name in ("full-lr1e-05-s0", "lora-r8-lr0.0001-s0")
    }
    dropped["base"] = _drop_measure(out / "base.json", "gsm8k_test_loss")
    if precision == "bf16":  # full finetuning's own start (fp32 weights) is a second base file
        dropped["base-full"] = _drop_measure(out / "base-full.json", "gsm8k_test_loss")
    markers = {n: (out / "runs" / n / "metrics.jsonl").stat().st_mtime_ns for n in dropped if "base" not in n}
    assert main(args) == 0
    again = json.loads((out / "results.json").read_text())
    for r in again["runs"]:
        assert r["scores"]["gsm8k_test_loss"] == pytest.approx(dropped[r["name"]], rel=1e-9)
        assert (out / "runs" / r["name"] / "metrics.jsonl").stat().st_mtime_ns == markers[r["name"]]
        assert (
            json.loads((out / "runs" / r["name"] / "done.json").read_text())["measured"]["2"]["scores"][
                "gsm8k_test_loss"
            ]
            == r["scores"]["gsm8k_test_loss"]
        )
    assert again["base"]["gsm8k_test_loss"] == pytest.approx(dropped["base"], rel=1e-9)
    if precision == "bf16":
        assert again["base_full_finetuning"]["gsm8k_test_loss"] == pytest.approx(dropped["base-full"], rel=1e-9)
    assert [r["learning"] for r in again["runs"]] == [r["learning"] for r in first["runs"]]


@pytest.mark.parametrize(
    "section, raw",
    [
        ("### Recorded run: faster measuring and scheduling, one pass", "learn_forget_fast.json"),
        ("### Recorded run: the default, one pass", "learn_forget_1pass.json"),
        ("### Recorded run: 1.8 passes", "learn_forget.json"),
    ],
)
def test_the_recorded_loss_tables_in_the_docs_match_the_raw_results(section, raw):
    """docs/experiments.md quotes each recorded run's held-out losses; every row must be its raw JSON's."""
    import statistics
    from pathlib import Path

    from deltatune.experiments.common import markdown_table

    root = Path(__file__).resolve().parents[1] / "docs"
    res = json.loads((root / "results" / raw).read_text())
    text = (root / "experiments.md").read_text()
    assert text.count(section) == 1
    text = text.split(section)[1].split("\n### ")[0]
    doc = text.split("#### Held-out losses: GSM8K test solutions")[1]
    rows = [line for line in doc.split("\n\n")[1].splitlines()[2:]]
    expected = []
    for r in sorted(res["runs"], key=lambda r: (list(res["picked_lr"]).index(r["method"]), r["lr"], r["seed"])):
        sc = r["scores"]
        cells = [r["method"], f"{r['lr']:g}", r["seed"], r["base_gsm8k_test_loss"], sc["gsm8k_test_loss"]]
        cells += [-r["learning_nats"], r["base_selfinstruct_loss"], sc["selfinstruct_loss"]]
        cells += [sc["selfinstruct_loss"] - r["base_selfinstruct_loss"]]
        expected.append(markdown_table([""] * len(cells), [cells]).splitlines()[-1])
    assert rows == expected and len(rows) == 24
    # the headline losses: each method's picked rate, mean and sd over its seeds
    head = text.split("#### Headline losses:")[1].split("\n\n")[1].splitlines()[2:]
    expected = []
    for method, lr in res["picked_lr"].items():
        sel = [r for r in res["runs"] if r["method"] == method and r["picked"]]
        cells = [method, f"{lr:g}", len(sel)]
        for values in (
            [r["val_loss"] for r in sel],
            [-r["learning_nats"] for r in sel],
            [r["scores"]["selfinstruct_loss"] - r["base_selfinstruct_loss"] for r in sel],
        ):
            cells += [statistics.fmean(values), statistics.stdev(values)]
        expected.append(markdown_table([""] * len(cells), [cells]).splitlines()[-1])
    assert head == expected


def test_epochs_are_passes_over_the_packed_examples(tmp_path, shared_data, monkeypatch):
    """--epochs 2 trains exactly two passes over the examples as packed into rows (the step count follows the
    packing, not examples / batch), and every run is measured at its own last step."""
    from deltatune.cli import main
    from deltatune.experiments import learn_forget

    monkeypatch.setitem(learn_forget.SIZES["quick"], "seq_len", 4096)  # rows long enough to hold several examples

    out = tmp_path / "lf"
    args = ["experiment", "learn-forget", "--quick", "--seeds", "1", "--lrs", "1", "--methods", "lora-r8"]
    assert main([*args, "--epochs", "2", "--train-examples", "24", "--threads", "1", "--quiet", "--out", str(out)]) == 0
    run = json.loads((out / "results.json").read_text())["runs"][0]
    log = [json.loads(line) for line in (out / "runs" / run["name"] / "metrics.jsonl").read_text().splitlines()]
    epochs = [rec["epoch"] for rec in log if "loss" in rec]
    assert epochs.count(0) == epochs.count(1) >= 1 and set(epochs) == {0, 1}
    done = json.loads((out / "runs" / run["name"] / "done.json").read_text())
    assert done["steps"] == len(epochs) and list(done["measured"]) == [str(len(epochs))]
    assert len(epochs) != 24 * 2 // 4  # what examples / batch would have given: packing fits several in a row


def test_a_finished_run_trained_with_other_settings_is_not_reused(tmp_path, shared_data, capsys):
    """A folder made when --epochs meant a step count (examples x epochs / batch) holds runs of another length
    under the same options: resuming it refuses, naming the run and the setting, instead of mixing lengths."""
    import yaml

    from deltatune.cli import main

    out = tmp_path / "lf"
    args = ["experiment", "learn-forget", "--quick", "--seeds", "1", "--lrs", "1", "--methods", "lora-r8"]
    args += ["--epochs", "2", "--threads", "1", "--quiet", "--out", str(out)]
    assert main(args) == 0
    config_file = out / "runs" / "lora-r8-lr0.0001-s0" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config.update(steps=4, epochs=1.0)  # what the earlier version trained for --epochs 2 on 8 examples
    config_file.write_text(yaml.safe_dump(config))
    before = (out / "results.json").read_bytes()
    capsys.readouterr()
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "lora-r8-lr0.0001-s0 was trained with steps 4, not the None asked for now" in err
    assert (out / "results.json").read_bytes() == before


def test_a_run_without_final_weights_cannot_be_backfilled(tmp_path, shared_data, capsys):
    """A finished run that lacks a measure and whose final weights were deleted: a one-line error naming the
    run folder, and the results already written stay as they were."""
    import shutil

    from deltatune.cli import main

    out = tmp_path / "lf"
    args = ["experiment", "learn-forget", "--quick", "--seeds", "1", "--lrs", "1", "--methods", "lora-r8"]
    args += ["--threads", "1", "--quiet", "--out", str(out)]
    assert main(args) == 0
    run = out / "runs" / "lora-r8-lr0.0001-s0"
    _drop_measure(run / "done.json", "gsm8k_test_loss")
    shutil.rmtree(run / "final")
    before = (out / "results.json").read_bytes()
    capsys.readouterr()
    assert main(args) != 0
    err = capsys.readouterr().err
    assert f"{run} has no final weights to measure" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert (out / "results.json").read_bytes() == before


def test_jobs_share_the_runs_and_give_the_results_of_one_process(tmp_path, shared_data, capfd, monkeypatch):
    """--jobs 2: a worker process trains some of the runs, each run is trained once, and with one thread per
    process the results equal those of one process with one thread (every run, every score)."""
    import time

    from deltatune.cli import main
    from deltatune.experiments.learn_forget import Measures

    def invocation(out, *extra):
        common = ["experiment", "learn-forget", "--quick", "--seeds", "2", "--lrs", "2"]
        return [*common, "--methods", "lora-r8,dora-r8", "--out", str(out), *extra]

    assert main(invocation(tmp_path / "one", "--threads", "1", "--quiet")) == 0
    capfd.readouterr()
    scores = Measures.scores

    def scores_once_the_worker_trains(self, *args, **kwargs):
        """This process scores the base first: it waits there until the worker (a new process, whose start-up
        outlasts the tiny runs) has claimed a run and made its folder, so the worker surely trains."""
        runs = tmp_path / "two" / "runs"
        deadline = time.monotonic() + 300
        while not (runs.is_dir() and any(runs.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.2)
        return scores(self, *args, **kwargs)

    monkeypatch.setattr(Measures, "scores", scores_once_the_worker_trains)
    assert main(invocation(tmp_path / "two", "--threads", "2", "--jobs", "2")) == 0
    err = capfd.readouterr().err
    trained_by_worker = {
        line.split()[5] for line in err.splitlines() if line.startswith("(worker 1)") and " step " in line
    }
    assert trained_by_worker, err  # the worker took runs
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["machine"]["torch_threads"] == 1 and two["jobs"] == 2
    assert len(two["runs"]) == 6

    def numbers(scores):  # without timings and item counts (named by the folder's data files)
        return {k: v for k, v in scores.items() if k not in ("n", "eval_seconds")}

    def table(res):
        return [(r["name"], r["val_loss"], r["learning_nats"], numbers(r["scores"])) for r in res["runs"]]

    assert table(two) == table(one)
    assert numbers(two["base"]) == numbers(one["base"])
    for r in two["runs"]:  # trained once: one line per step in its metrics
        steps = [json.loads(x)["step"] for x in (tmp_path / "two" / "runs" / r["name"] / "metrics.jsonl").open()]
        assert steps == sorted(set(steps))


def test_jobs_must_be_positive_and_at_most_the_cores(tmp_path, capsys):
    import os

    from deltatune.cli import main

    rc = main(["experiment", "learn-forget", "--quick", "--jobs", "0", "--out", str(tmp_path / "o")])
    assert rc == 2 and "--jobs must be at least 1" in capsys.readouterr().err
    rc = main(
        ["experiment", "learn-forget", "--quick", "--jobs", str(os.cpu_count() + 1), "--out", str(tmp_path / "o")]
    )
    assert rc == 2 and "cores here" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_worker_gets_its_share_of_threads_and_no_jobs():
    from deltatune.cli.experiment import _worker_argv

    argv = ["experiment", "learn-forget", "--jobs", "2", "--threads=4", "--out", "x", "--jobs=3", "--threads", "2"]
    assert _worker_argv(argv, 1) == ["experiment", "learn-forget", "--out", "x", "--threads", "1"]


def test_a_folder_made_under_other_default_sizes_is_refused(tmp_path, shared_data, capsys):
    """The manifest records the sizes the defaults resolved to: a folder from a version with other defaults
    (no sizes recorded, or other ones) is refused with one line, not resumed with runs of two setups."""
    from deltatune.cli import main

    out = tmp_path / "lf"
    args = ["experiment", "learn-forget", "--quick", "--seeds", "1", "--lrs", "1", "--methods", "lora-r8"]
    args += ["--threads", "1", "--quiet", "--out", str(out)]
    assert main(args) == 0
    manifest = json.loads((out / "experiment.json").read_text())
    assert manifest["settings"]["sizes"]["generate_batch"] == 4
    manifest["settings"]["sizes"]["generate_batch"] = 16
    (out / "experiment.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(args) != 0
    assert "resume it with the same options or choose another --out" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value, says", [("--train-examples", "100000", "at most"), ("--epochs", "nan", "positive")]
)
def test_sizes_no_run_can_use_are_one_line_before_the_folder_is_claimed(
    tmp_path, shared_data, capsys, flag, value, says
):
    """--train-examples past GSM8K's train set trained every run, then stopped on a missing validation loss (a
    traceback); --epochs nan was refused only inside the first run, after the base was scored."""
    from deltatune.cli import main

    out = tmp_path / "lf"
    args = ["experiment", "learn-forget", "--quick", "--threads", "1", "--quiet", "--out", str(out), flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"field '{flag[2:]}'" in err and says in err and not out.exists()
