"""The experiment framework: finished runs survive a kill and are not redone; foreign folders are refused."""

import json

import pytest

from deltatune.errors import UserError
from deltatune.experiments.common import DONE, Context, Run, markdown_table, measure_points, seed_list


def _runs(calls: list, kill_in: str | None = None) -> list[Run]:
    def measure_for(name):
        def measure(step, model):
            calls.append((name, step))
            if name == kill_in and step == 3:
                raise KeyboardInterrupt  # stands in for SIGKILL mid-run: no done marker is written
            return {"param_sum": float(sum(p.detach().float().sum() for p in model.parameters()))}

        return measure

    records = [{"instruction": f"What is {a} + {b}?", "output": f"{a + b}"} for a in range(4) for b in range(4)]
    cfg = dict(
        method="lora",
        rank=2,
        alpha=4,
        lr=1e-2,
        steps=3,
        batch_size=4,
        seq_len=64,
        precision="fp32",
        warmup_steps=0,
        seed=1,
        eval_fraction=0.0,
    )
    return [
        Run(name, dict(cfg), records=records, measure=measure_for(name), measure_steps=(1, 3), meta={"arm": name})
        for name in ("first", "second")
    ]


def test_killed_experiment_resumes_without_redoing_finished_runs(tmp_path):
    out = tmp_path / "exp"
    calls: list = []
    ctx = Context("toy", out, quick=True, seeds=[0], quiet=True)
    with pytest.raises(KeyboardInterrupt):
        ctx.run_all(_runs(calls, kill_in="second"))
    assert calls == [("first", 1), ("first", 3), ("second", 1), ("second", 3)]
    first_done = (out / "runs" / "first" / DONE).read_bytes()
    assert not (out / "runs" / "second" / DONE).exists()

    calls.clear()
    results = Context("toy", out, quick=True, seeds=[0], quiet=True).run_all(_runs(calls))
    assert calls == [("second", 1), ("second", 3)]  # the finished run is read back, not trained again
    assert (out / "runs" / "first" / DONE).read_bytes() == first_done
    assert results["first"] == json.loads(first_done)
    second = results["second"]
    assert second["steps"] == 3 and second["arm"] == "second" and sorted(second["measured"]) == ["1", "3"]
    assert second["trainable_params"] > 0 and len(second["losses"]) == 3
    metrics = (out / "runs" / "second" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["step"] for m in metrics] == [1, 2, 3]  # the partial run was started over, not appended
    assert "param_sum" in json.loads(metrics[0]) and "param_sum" not in json.loads(metrics[1])
    for name in ("first", "second"):
        assert (out / "runs" / name / "config.yaml").exists() and (out / "runs" / name / "final").is_dir()


def test_foreign_or_mismatched_folder_is_refused(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an experiment folder"):
        Context("toy", tmp_path / "busy", quick=True, seeds=[0], quiet=True)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    Context("toy", tmp_path / "exp", quick=True, seeds=[0], settings={"n": 0}, quiet=True)  # failed before any run
    Context("toy", tmp_path / "exp", quick=True, seeds=[0], settings={"n": 1}, quiet=True)  # so it may be retaken
    (tmp_path / "exp" / "runs").mkdir()  # a run has started: the settings are now fixed
    with pytest.raises(UserError, match="same options"):
        Context("toy", tmp_path / "exp", quick=True, seeds=[0, 1], settings={"n": 1}, quiet=True)
    with pytest.raises(UserError, match="same options"):
        Context("other", tmp_path / "exp", quick=True, seeds=[0], settings={"n": 1}, quiet=True)


def test_helpers():
    assert measure_points(100, 4) == (25, 50, 75, 100)
    assert measure_points(3, 4) == (1, 2, 3)
    assert seed_list(3) == [0, 1, 2]
    with pytest.raises(UserError):
        seed_list(0)
    assert markdown_table(["a", "b"], [[1, 0.5], ["x", None]]) == "| a | b |\n|---|---|\n| 1 | 0.500 |\n| x | - |"
    assert markdown_table(["lr"], [[1e-4], [2e-3], [0.0]]) == "| lr |\n|---|\n| 0.0001 |\n| 0.002 |\n| 0.000 |"


def test_a_claim_is_exclusive_until_released(tmp_path):
    from deltatune.experiments.common import Claim

    first = Claim.take(tmp_path, "run-a")
    assert first is not None
    assert Claim.take(tmp_path, "run-a") is None  # held (a lock per open file: another process sees the same)
    assert Claim.take(tmp_path, "run-b") is not None
    first.release()
    assert Claim.take(tmp_path, "run-a") is not None


def test_a_run_claimed_elsewhere_is_waited_for_then_taken_over_when_its_holder_dies(tmp_path, monkeypatch, capsys):
    """Another process holds run 'first': this one trains 'second' meanwhile, then waits; the holder dies
    (its lock drops) without finishing, so this process trains 'first' itself, from the start."""
    import threading

    from deltatune.experiments import common

    monkeypatch.setattr(common, "POLL_SECONDS", 0.05)
    out = tmp_path / "exp"
    ctx = Context("toy", out, quick=True, seeds=[0])
    other = ctx.claim("first")
    (out / "runs" / "first").mkdir(parents=True)
    (out / "runs" / "first" / "metrics.jsonl").write_text('{"step": 1}\n')  # the holder's partial run
    calls: list = []
    runs = _runs(calls)
    measure = runs[1].measure

    def second_then_die(step, model):  # the holder dies while this process trains 'second'
        if step == 3:
            other.release()
        return measure(step, model)

    runs[1].measure = second_then_die
    timer = threading.Timer(30, other.release)  # never needed unless the test is broken: no hang
    timer.start()
    try:
        results = ctx.run_all(runs)
    finally:
        timer.cancel()
    assert calls == [("second", 1), ("second", 3), ("first", 1), ("first", 3)]
    assert list(results) == ["first", "second"] and results["first"]["steps"] == 3
    metrics = (out / "runs" / "first" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["step"] for m in metrics] == [1, 2, 3]  # started over, not appended to
    assert "first: being trained by another process" in capsys.readouterr().err


def test_a_run_finished_by_another_process_is_read_back_not_trained(tmp_path, monkeypatch, capsys):
    """Another process holds 'first' and finishes it while this one trains 'second': 'first' is waited for and
    read back, never trained here."""
    from deltatune.experiments import common

    monkeypatch.setattr(common, "POLL_SECONDS", 0.05)
    out = tmp_path / "exp"
    calls: list = []
    Context("toy", out, quick=True, seeds=[0], quiet=True).run_all(_runs(calls)[:1])  # 'first', as the other did
    done = (out / "runs" / "first" / DONE).read_bytes()
    (out / "runs" / "first" / DONE).rename(out / "done.tmp")
    ctx = Context("toy", out, quick=True, seeds=[0])
    other = ctx.claim("first")
    runs = _runs(calls)
    measure = runs[1].measure

    def second_while_first_finishes(step, model):
        if step == 3:  # the other process writes its marker, then lets go of the claim
            (out / "done.tmp").rename(out / "runs" / "first" / DONE)
            other.release()
        return measure(step, model)

    runs[1].measure = second_while_first_finishes
    calls.clear()
    results = ctx.run_all(runs)
    assert calls == [("second", 1), ("second", 3)]  # 'first' was finished by its holder, not trained here
    assert results["first"] == json.loads(done)
    assert "first: being trained by another process" in capsys.readouterr().err


def test_each_run_hands_its_memory_back(tmp_path, monkeypatch):
    """glibc keeps a finished run's freed memory (9.8 GB after a DoRA run of learn-forget): every run ends by
    trimming it, so a long experiment does not hold each run's peak."""
    from deltatune.experiments import common

    trims = []
    monkeypatch.setattr(common, "release_memory", lambda: trims.append(1))
    Context("toy", tmp_path / "exp", quick=True, seeds=[0], quiet=True).run_all(_runs([]))
    assert len(trims) == 2


def test_a_run_that_trains_alone_waits_for_the_others_and_holds_back_the_rest(tmp_path, monkeypatch, capsys):
    """Another process is training (a shared claim on "training"): this one's `alone` run waits, though nobody
    holds the run itself, and no ordinary run starts here meanwhile (it would keep the alone run waiting for
    this process in turn); the alone run trains as soon as the other process is done, holding the claim
    exclusively, and the ordinary run trains after it. The alone run goes first though listed second."""
    import threading

    from deltatune.experiments import common

    monkeypatch.setattr(common, "POLL_SECONDS", 0.05)
    ctx = Context("toy", tmp_path / "exp", quick=True, seeds=[0])
    other = ctx.claim("training", shared=True)
    calls: list = []
    runs = _runs(calls)
    runs[1].alone = True
    measure_alone = runs[1].measure
    beside_alone = []

    def alone_checks_it_is_alone(step, model):
        beside_alone.append(ctx.claim("training", shared=True))  # what another process would get now
        return measure_alone(step, model)

    runs[1].measure = alone_checks_it_is_alone
    timer = threading.Timer(1.0, other.release)  # the other process finishes its run
    timer.start()
    try:
        results = ctx.run_all(runs)
    finally:
        timer.cancel()
    assert calls == [("second", 1), ("second", 3), ("first", 1), ("first", 3)]
    assert beside_alone == [None, None]
    assert list(results) == ["first", "second"]  # in the order asked, whatever the order trained
    err = capsys.readouterr().err
    assert "second: later: it trains alone" in err and "first: later" not in err
    assert ctx.claim("training") is not None  # released after training


def test_follow_up_runs_join_as_soon_as_what_they_need_is_done(tmp_path):
    """`follow` is asked after each finished run: a run that the first result makes ready trains before the
    runs still listed (an alone follow-up goes first), and the results come back in the order they were known."""
    calls: list = []
    runs = _runs(calls)
    extra = _runs(calls)[0]
    extra.name, extra.alone = "first-again", True
    extra.measure = lambda step, model: calls.append(("first-again", step)) or {}
    asked: list = []

    def follow(done):
        asked.append(sorted(done))
        return [extra] if "first" in done else []

    results = Context("toy", tmp_path / "exp", quick=True, seeds=[0], quiet=True).run_all(runs, follow=follow)
    assert [c[0] for c in calls] == ["first", "first", "first-again", "first-again", "second", "second"]
    assert list(results) == ["first", "second", "first-again"]
    assert asked == [[], ["first"], ["first", "first-again"], ["first", "first-again", "second"]]


def test_a_run_that_trains_alone_uses_every_process_threads(tmp_path):
    """With --jobs 2 and one thread a process, the other process waits while an `alone` run trains, so that
    run trains on both threads; the next run is back on one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seen: list = []
        runs = _runs([])
        for run in runs:
            measure = run.measure
            run.measure = lambda step, model, m=measure: (seen.append(torch.get_num_threads()), m(step, model))[1]
        runs[0].alone = True
        Context("toy", tmp_path / "exp", quick=True, seeds=[0], quiet=True, jobs=2).run_all(runs)
        assert seen == [2, 2, 1, 1] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
