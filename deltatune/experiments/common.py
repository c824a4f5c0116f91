"""What every experiment shares: runs, resume, progress, seeds, quick mode, result files.

An experiment is a list of named `Run`s. Each is an ordinary `deltatune train` run in its own folder
OUT/runs/NAME (config.yaml, metrics.jsonl, final/), so any of them can be reopened with the usual
commands. After a run and its measurements finish, OUT/runs/NAME/done.json is written atomically;
a restarted experiment reads that marker instead of training again, and an unfinished run folder
(killed mid-run) is cleared and trained from the start. OUT/experiment.json names the experiment
and its settings: an OUT that holds anything else, or the same experiment with other settings, is
refused, never overwritten.

Several processes may share one OUT (`--jobs N` starts N-1 workers; two invocations on the same OUT
cooperate the same way): a run is trained by the process that holds its claim, an exclusive lock on
OUT/claims/NAME.lock that the OS releases when the holder exits or dies, so a run is never trained
twice at once and a dead process's run is taken over. The others go on to the next run and wait for
the claimed ones (their done.json) at the end. Runs train under a shared claim on "training"; a run
marked `alone` (its memory peak leaves no room for another) takes it exclusively, and goes first: the
processes finish what they train and then do the exclusive runs one after another, rather than each of
them waiting for a busy process mid-experiment. Runs whose settings depend on finished ones (a learning
rate picked from a sweep) join as soon as those are done (`run_all(follow=...)`), not after a barrier.

Results: `Context.finish` writes results.json (every run's numbers, seeds, the machine, wall
time), results.md (the tables) and the PNG plots (`save_figure`), each atomically.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from deltatune.errors import UserError

DONE = "done.json"
MANIFEST = "experiment.json"
CLAIMS = "claims"
WORKER_ENV = "DELTATUNE_EXPERIMENT_WORKER"  # "k/N": this process is worker k of an invocation with --jobs N
POLL_SECONDS = 2.0
# run settings not compared when a finished run is reused: where the run reads from and writes to
NOT_COMPARED = frozenset({"model", "output", "data", "eval_data", "resume", "overwrite"})
StepHook = Callable[[int, int, Any], "dict | None"]  # (step, total_steps, model) -> metrics for that step
FollowUps = Callable[[dict[str, dict]], "list[Run]"]  # finished runs' results, by name -> the runs they make ready
WAITS_ALONE = "later: it trains alone"  # an alone run while another process trains
WAITS_FOR_ALONE = "later: a run that trains alone is on"
HELD_ELSEWHERE = "being trained by another process"


@dataclass
class Run:
    """One training run of an experiment.

    `config` holds TrainConfig keys (the framework sets `output`, and `model` unless given);
    `records`/`eval_records` pass data in memory (or set `data` in `config`); `measure(step, model)`
    is called at each step in `measure_steps` (and at the last one with `measure_last`, for runs whose
    length is known only once the data is packed) with the model in eval mode and returns numbers to
    keep; `meta` is copied into the result (method, seed, dataset, ... for the tables); an `alone` run
    trains only while no other process sharing the folder trains one.
    """

    name: str
    config: dict[str, Any]
    records: list[dict] | None = None
    eval_records: list[dict] | None = None
    measure: Callable[[int, Any], dict] | None = None
    measure_steps: tuple[int, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    measure_last: bool = False
    # trains while no other process sharing the folder trains (with --jobs: a run whose memory peak leaves no
    # room for a second run, such as learn-forget's DoRA runs)
    alone: bool = False


def measure_points(total_steps: int, n: int) -> tuple[int, ...]:
    """`n` evenly spaced steps ending at the last one, e.g. (25, 50, 75, 100) for (100, 4)."""
    n = max(1, min(n, total_steps))
    return tuple(sorted({max(1, round(total_steps * (i + 1) / n)) for i in range(n)}))


def seed_list(n: int, base: int = 0) -> list[int]:
    """The fixed seeds of `--seeds n`: base, base+1, ... (reported in results.json)."""
    if n < 1:
        raise UserError("--seeds must be at least 1")
    return [base + i for i in range(n)]


class Claim:
    """An exclusive, non-blocking lock on OUT/claims/KEY.lock, held until `release` (or the process ends:
    the OS drops a dead process's lock, so nothing is ever left claimed by a killed run)."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    @classmethod
    def take(cls, folder: Path, key: str, shared: bool = False) -> "Claim | None":
        """The claim, or None while another live process holds it (`shared`: claims that other shared
        claims of the key do not exclude, only an exclusive one)."""
        try:
            import fcntl
        except ImportError:  # no POSIX locks (Windows): one process per folder, every claim succeeds
            return cls(None)
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:  # e.g. a network filesystem without locks
            os.close(fd)
            raise UserError(f"cannot lock {folder / key}.lock ({exc.strerror}); use a local --out") from None
        return cls(fd)

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)  # explicitly: a forked child sharing the descriptor keeps no lock
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def worker_index() -> tuple[int, int]:
    """(k, N) when this process is worker k of `--jobs N` (WORKER_ENV is "k/N/parent pid"), else (0, 1)."""
    value = os.environ.get(WORKER_ENV, "")
    try:
        k, n, _ = (int(x) for x in value.split("/"))
    except ValueError:
        return 0, 1
    return k, n


def worker_orphaned() -> bool:
    """Whether this process is a `--jobs` worker whose invoking process has gone (killed, say): it then
    stops instead of training the rest alone."""
    value = os.environ.get(WORKER_ENV, "")
    return value.count("/") == 2 and value.rsplit("/", 1)[1] != str(os.getppid())


def release_memory() -> None:
    """Hand the memory a finished run freed back to the OS. glibc keeps freed memory in its heap: after a
    learn-forget DoRA run a process held 9.8 GB it no longer used (malloc_trim took it to 1.2 GB), so a long
    experiment, or two `--jobs` processes, kept every run's peak and a second process ran out of memory."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        pass


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write a file under a temporary name and rename it into place: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return write_atomic(path, buf.getvalue())


def machine_info() -> dict[str, Any]:
    """CPU model, the SIMD flags that decide speed and precision, cores, and library versions."""
    import torch

    model, flags = platform.processor() or "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", "", "x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = sorted(have & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma", "avx512_vnni"})
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "flags": flags,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table; floats with 3 significant decimals, None as '-'."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if 0 < abs(v) < 0.01:  # learning rates and the like: 1e-4, not 0.000
                return f"{v:.3g}"
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def quick_model(folder: Path) -> str:
    """The tiny random model of `--quick`, saved once as a transformers folder (so runs can be reopened)."""
    if not (folder / "config.json").exists():
        from transformers.utils import logging as hf_logging

        from deltatune.fileio import atomic_dir
        from deltatune.testing import tiny_model, tiny_tokenizer

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a one-shard bar for a model saved in milliseconds is noise
        try:
            with atomic_dir(folder) as tmp:
                tiny_model().save_pretrained(tmp)
                tiny_tokenizer().save_pretrained(tmp)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
    return str(folder)


class Context:
    """One experiment invocation: its folder, mode, seeds and model, and the machinery to run it.

    `settings` are the options that define the experiment's results (mode, seeds, sizes...): once a run
    has started, a restart with other settings is refused, so resumed runs never mix with another setup.
    `selectors` name the settings that only choose which runs to do (learn-forget's seeds and methods: each
    run is named by them and computed without the others): a restart may change those, so runs can be
    added to a finished experiment; the manifest then records the latest invocation's choice.
    `worker` is k > 0 in the worker processes of `--jobs` (they train runs and write no results), `jobs`
    the number of processes sharing the folder (for the ETA).
    """

    def __init__(
        self,
        name: str,
        out: str | os.PathLike,
        *,
        quick: bool,
        seeds: list[int],
        settings: dict[str, Any] | None = None,
        selectors: tuple[str, ...] = (),
        model: str | None = None,
        quiet: bool = False,
        worker: int = 0,
        jobs: int = 1,
    ) -> None:
        self.name, self.out, self.quick, self.seeds = name, Path(out), quick, seeds
        self.worker, self.jobs = worker, max(1, jobs)
        self.settings = {"quick": quick, "seeds": seeds, **(settings or {})}
        self.selectors = selectors
        self.quiet = quiet
        self.started = time.perf_counter()
        self._claim_folder()
        self.model = model if model is not None else (quick_model(self.out / "quick-model") if quick else None)
        self._steps_done = 0  # steps trained in this process (for the ETA)
        self._train_seconds = 0.0
        self.before_first_claim: Callable[[], None] | None = None  # starts --jobs workers once options are checked

    # --- the output folder ----------------------------------------------------------------
    def _claim_folder(self) -> None:
        manifest = self.out / MANIFEST
        wanted = {"experiment": self.name, "settings": self.settings}
        if manifest.exists():
            try:
                found = json.loads(manifest.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                raise UserError(f"{manifest} is not an experiment manifest; choose another --out") from None
            if not (isinstance(found, dict) and isinstance(found.get("experiment"), str) and "settings" in found):
                # some other tool's experiment.json: the folder is the user's, never retaken or written into
                raise UserError(
                    f"{self.out} exists and is not an experiment folder of '{self.name}' ({manifest} is not a "
                    "deltatune manifest); choose an empty or new --out"
                )

            def defining(settings: dict) -> dict:
                return {k: v for k, v in settings.items() if k not in self.selectors}

            found_settings, asked = found.get("settings") or {}, json.loads(json.dumps(self.settings))
            same = found.get("experiment") == self.name and defining(found_settings) == defining(asked)
            if same and found_settings != asked:  # other runs chosen: record them
                write_atomic(manifest, json.dumps(wanted, indent=2) + "\n")
                return
            if not same and not (self.out / "runs").exists():  # nothing trained yet (it failed at set-up): retake
                write_atomic(manifest, json.dumps(wanted, indent=2) + "\n")
                return
            if not same:
                raise UserError(
                    f"{self.out} holds experiment '{found.get('experiment')}' with settings "
                    f"{found.get('settings')}; resume it with the same options or choose another --out"
                )
            return
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise UserError(
                f"{self.out} exists and is not an experiment folder of '{self.name}'; choose an empty or new --out"
            )
        write_atomic(manifest, json.dumps(wanted, indent=2) + "\n")

    def config_defaults(self) -> dict[str, Any]:
        """Settings under every run's own: quick mode skips compiling the fused norms (seconds per run on a
        model that trains in seconds), and runs log rarely (the experiment prints its own progress)."""
        return {"fused_norms": "off", "log_every": 50} if self.quick else {"log_every": 50}

    def run_dir(self, name: str) -> Path:
        return self.out / "runs" / name

    # --- running ---------------------------------------------------------------------------
    def claim(self, key: str, shared: bool = False) -> Claim | None:
        """This process's exclusive claim on `key` (a run's name, or a shared measurement's file name), or
        None while another live process holds it; `shared` claims exclude only an exclusive one."""
        if self.before_first_claim is not None:  # the experiment has checked its options: workers may start
            start, self.before_first_claim = self.before_first_claim, None
            start()
        if worker_orphaned():
            raise SystemExit(f"(worker {self.worker}) the invoking process has ended; stopping")
        return Claim.take(self.out / CLAIMS, key, shared)

    def run_all(self, runs: list[Run], follow: FollowUps | None = None) -> dict[str, dict]:
        """Train every run not yet done and return each run's result, by name (the given runs, then the
        follow-ups in the order they became known).

        Runs are taken in order, `alone` runs first. A run another process holds is passed over and taken up
        again once this process has nothing else to train (or taken over if that process dies). An `alone`
        run that waits for the other processes to finish their runs holds back the runs after it, so that
        the exclusive runs go one after another instead of each waiting for a busy process to come free.
        `follow(results)` is asked after every finished run for the runs that the results so far make
        ready (a rate picked from a sweep, run again with another seed): every process sharing the folder
        asks it of the same finished runs, so all of them add the same runs, as soon as they are ready."""
        pending, order = list(runs), [r.name for r in runs]
        if len(set(order)) != len(order):
            raise ValueError(f"run names must be unique: {order}")
        index = {name: i for i, name in enumerate(order, 1)}
        todo_steps = {r.name: self._total_steps(r) for r in runs if not (self.run_dir(r.name) / DONE).exists()}
        results: dict[str, dict] = {}
        told: set[tuple[str, str]] = set()

        def add_follow_ups() -> None:
            for run in follow(results) if follow is not None else []:
                if run.name not in index:
                    order.append(run.name)
                    index[run.name] = len(order)
                    pending.append(run)
                    if not (self.run_dir(run.name) / DONE).exists():
                        known = next((r["steps"] for r in results.values()), None)  # by epochs: as a finished one
                        todo_steps[run.name] = self._total_steps(run) or known

        add_follow_ups()  # a resumed experiment may have them ready already
        while pending:
            pending.sort(key=lambda r: not r.alone)  # stable: alone runs first, each group in its order
            finished = None
            for run in pending:
                result = self._finish_run(run, index[run.name], len(order), todo_steps)
                if not isinstance(result, str):
                    finished = run
                    results[run.name] = result
                    break
                if (run.name, result) not in told:
                    told.add((run.name, result))
                    self.say(f"[{self.name}] run {index[run.name]}/{len(order)} {run.name}: {result}")
                if result == HELD_ELSEWHERE:
                    todo_steps.pop(run.name, None)  # another process's: not in this one's ETA
                if result in (WAITS_ALONE, WAITS_FOR_ALONE):
                    break  # nothing after it can start now (a run that trains alone goes first, or is on)
            if finished is None:
                time.sleep(POLL_SECONDS)
                continue
            pending.remove(finished)
            todo_steps.pop(finished.name, None)
            for name, steps in todo_steps.items():  # runs asked for by epochs: estimate by any finished one
                if steps is None:
                    todo_steps[name] = results[finished.name]["steps"]
            add_follow_ups()
        return {name: results[name] for name in order}

    def _finish_run(self, run: Run, index: int, count: int, todo_steps: dict[str, int | None]) -> dict | str:
        """The run's result: read back if done, else trained here; while another process holds the run (or
        a run of its exclusive group), why it waits."""
        done = self.run_dir(run.name) / DONE
        if not done.exists():
            claim = self.claim(run.name)
            if claim is None:
                return HELD_ELSEWHERE
            with claim:
                if not done.exists():  # (re-checked under the claim: another process may just have finished it)
                    # every run trains under a shared claim on "training"; an `alone` run needs it exclusive
                    room = self.claim("training", shared=not run.alone)
                    if room is None:
                        return WAITS_ALONE if run.alone else WAITS_FOR_ALONE
                    with room, self._all_threads(run.alone):
                        result = self._train_one(run, index, count, todo_steps)
                    return result
        stale = self._stale_setting(run)
        if stale:
            raise UserError(
                f"{self.run_dir(run.name)} was trained with {stale}; a finished run is reused only "
                "with the settings it was trained with (an option's meaning may have changed since): "
                "resume with its options or choose another --out"
            )
        self.say(f"[{self.name}] run {index}/{count} {run.name}: done, kept")
        return json.loads(done.read_text(encoding="utf-8"))

    @contextmanager
    def _all_threads(self, alone: bool):
        """A run that trains alone uses the threads of every process sharing the folder (they wait meanwhile)."""
        import torch

        threads = torch.get_num_threads()
        if alone and self.jobs > 1:
            torch.set_num_threads(threads * self.jobs)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def _stale_setting(self, run: Run) -> str | None:
        """The first setting a finished run's config.yaml disagrees on with what this invocation asks (its
        step count always: a run asked for by epochs must not have trained a fixed count), or None."""
        import yaml

        path = self.run_dir(run.name) / "config.yaml"
        if not path.exists():
            return None
        stored = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for key, value in {"steps": None, **run.config}.items():
            if key in NOT_COMPARED or key not in stored or not isinstance(value, (int, float, str, bool, type(None))):
                continue
            if stored[key] != value:
                return f"{key} {stored[key]!r}, not the {value!r} asked for now"
        return None

    def _total_steps(self, run: Run) -> int | None:
        return run.config.get("steps")

    def _train_one(self, run: Run, index: int, count: int, todo_steps: dict[str, int | None]) -> dict:
        from deltatune.config import load_config
        from deltatune.train.loop import train

        folder = self.run_dir(run.name)
        if folder.exists():  # killed before its done marker: this experiment's own partial run, start it over
            shutil.rmtree(folder)
        overrides = {
            "model": self.model,
            **self.config_defaults(),
            **run.config,
            "output": str(folder),
            "resume": False,
        }
        cfg = load_config(overrides=overrides)
        measured: dict[int, dict] = {}
        measure_seconds = 0.0
        later = sum(s or 0 for n, s in todo_steps.items() if n != run.name) / self.jobs  # shared by the processes
        started, last_print = time.perf_counter(), 0.0

        def on_step(step: int, total: int, model) -> dict | None:
            nonlocal last_print, measure_seconds
            out = None
            if run.measure is not None and (step in run.measure_steps or (run.measure_last and step == total)):
                t0 = time.perf_counter()
                out = run.measure(step, model)
                measured[step] = out
                measure_seconds += time.perf_counter() - t0
            elapsed = time.perf_counter() - started
            now = time.perf_counter()
            if now - last_print > 5 or step == total or out:
                per_step = (self._train_seconds + elapsed) / max(1, self._steps_done + step)
                eta = per_step * (total - step + later)
                self.say(
                    f"[{self.name}] run {index}/{count} {run.name} step {step}/{total}"
                    f" | experiment ETA {format_seconds(eta)}"
                    + (
                        " | " + ", ".join(f"{k} {v:.3g}" for k, v in out.items() if isinstance(v, (int, float)))
                        if out
                        else ""
                    )
                )
                last_print = now
            return out

        result = train(cfg, quiet=True, records=run.records, eval_records=run.eval_records, on_step=on_step)
        self._steps_done += result.steps
        self._train_seconds += time.perf_counter() - started
        params = json.loads((folder / "parameters.json").read_text(encoding="utf-8"))
        train_seconds = max(result.seconds - measure_seconds, 1e-9)  # training alone, without the measurements
        summary = {
            "name": run.name,
            **run.meta,
            "steps": result.steps,
            "final_loss": result.final_loss,
            "eval_loss": result.eval_loss,
            "tokens_per_s": result.real_tokens / train_seconds,
            "real_tokens": result.real_tokens,
            "train_seconds": train_seconds,
            "measure_seconds": measure_seconds,
            "trainable_params": params.get("trainable"),
            "total_params": params.get("total"),
            "losses": [h["loss"] for h in result.history],
            "measured": {str(k): v for k, v in sorted(measured.items())},
        }
        write_atomic(folder / DONE, json.dumps(summary, indent=2) + "\n")
        del result
        release_memory()
        return summary

    # --- output ----------------------------------------------------------------------------
    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"(worker {self.worker}) {text}" if self.worker else text, file=sys.stderr, flush=True)

    def finish(
        self, results: dict[str, Any], tables: list[tuple[str, str]], plots: list[str] = (), notes: list[str] = ()
    ) -> Path | None:
        """Write results.json and results.md; `tables` are (title, markdown table), `plots` PNG names in OUT.
        Only the invoked process writes them: a `--jobs` worker returns None."""
        if self.worker:
            return None
        wall = time.perf_counter() - self.started
        earlier = self.keep_earlier_report()
        all_wall = wall + float(earlier.get("wall_s_all_invocations", earlier.get("wall_s", 0)) if earlier else 0)
        doc = {
            "experiment": self.name,
            "command": " ".join(["deltatune", *sys.argv[1:]]) if sys.argv else "",
            "settings": self.settings,
            "seeds": self.seeds,
            "model": self.model or "default",
            "machine": machine_info(),
            "jobs": self.jobs,  # processes that trained the runs (per-run seconds depend on it)
            "wall_s": round(wall, 1),  # this invocation's
            "wall_s_all_invocations": round(all_wall, 1),  # with the earlier ones that trained into this folder
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **results,
        }
        write_atomic(self.out / "results.json", json.dumps(doc, indent=2, default=str) + "\n")
        md = [
            f"# {self.name} ({'quick' if self.quick else 'full'})",
            "",
            f"seeds {self.seeds}; model {doc['model']}; {doc['machine']['cpu']} ({doc['machine']['cores']} cores); "
            f"wall {format_seconds(wall)} (this invocation)",
            "",
        ]
        for title, table in tables:
            md += [f"## {title}", "", table, ""]
        md += [f"![{p}]({p})" for p in plots] + ([""] if plots else [])
        md += list(notes)
        write_atomic(self.out / "results.md", "\n".join(md).rstrip() + "\n")
        self.say(f"[{self.name}] results in {self.out / 'results.md'} ({format_seconds(wall)})")
        return self.out / "results.json"

    def keep_earlier_report(self) -> dict | None:
        """Move aside an earlier report of other seeds or methods (kept, not replaced), before this one writes
        anything of its own: called before an experiment draws its plots (they overwrote the earlier report's
        PNGs, which were then archived as its own, and the new results.md linked to plots no longer there).
        Returns the earlier report (read once: later calls return what the first found)."""
        if not hasattr(self, "_earlier"):
            self._earlier = self._earlier_report()
            settings = json.loads(json.dumps(self.settings, default=str))
            if self._earlier is not None and self._earlier.get("settings") != settings and not self.worker:
                self._archive_report(self._earlier)
        return self._earlier

    def _earlier_report(self) -> dict | None:
        """The results.json an earlier invocation wrote into this folder, if it is one of ours."""
        try:
            found = json.loads((self.out / "results.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return found if isinstance(found, dict) and found.get("experiment") == self.name else None

    def _archive_report(self, earlier: dict) -> None:
        """Move an earlier report (results.json, results.md, the plots) of other seeds or methods into
        OUT/reports/<when it finished>/: a later invocation reports the runs it was asked for, and a narrower one
        replaced the full report silently."""
        stamp = str(earlier.get("finished") or "earlier").replace(":", "")
        folder, n = self.out / "reports" / stamp, 1
        while folder.exists():  # two reports finished in the same second
            n += 1
            folder = self.out / "reports" / f"{stamp}-{n}"
        folder.mkdir(parents=True)
        report = [self.out / name for name in ("results.json", "results.md", "recorded.json")]  # recorded: masking's
        for path in [*report, *sorted(self.out.glob("*.png"))]:
            if path.exists():
                os.replace(path, folder / path.name)
        self.say(f"[{self.name}] the earlier report (other seeds or methods) is kept in {folder}")


def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def generation_prompts(records: list[dict], tokenizer, template: str) -> list[str]:
    """Each record's prompt exactly as training renders it (template, role tokens), up to the response.

    Built from the training data path's own tokenization: the tokens before the first response
    token, decoded with special tokens kept, so generation starts where the trained response starts.
    """
    from deltatune.data.pipeline import prepare_records
    from deltatune.data.segments import Role

    prepared = prepare_records(records, tokenizer, template=template, max_len=10**9)
    if len(prepared.examples) != len(records):
        raise ValueError(f"{len(records) - len(prepared.examples)} records had no response to generate")
    prompts = []
    for ex in prepared.examples:
        first = ex.roles.index(Role.RESPONSE)
        prompts.append(tokenizer.decode(ex.input_ids[:first], skip_special_tokens=False))
    return prompts


def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy continuations (stopped at end of turn), stripped."""
    from deltatune.evaluate.generate import GenerationConfig, generate

    texts = generate(
        model,
        tokenizer,
        prompts,
        GenerationConfig(max_new_tokens=max_new_tokens),
        batch_size=batch_size,
        progress=False,
    )
    return [t.strip() for t in texts]
