"""Run generated programs: one process per sample, in an empty temporary folder, with limits.

What is enforced on each sample (see docs/evaluation.md, "Code execution"):
- a separate process (`python -I`: no PYTHONPATH, no user site) in its own session, started in a
  fresh empty temporary folder that is deleted afterwards;
- resource limits (`resource.setrlimit`, the program's first statements, before any of the model's
  code): address space (memory), CPU seconds, size of any file it writes, no core dumps;
- a wall-clock timeout after which the whole process group is killed (SIGKILL): a timeout, crash or
  infinite loop is a failed sample, never a hang of the evaluator;
- no network: the child runs in a new user + network namespace (`unshare -rn`) where the system
  allows it (probed once); in every case a guard prelude replaces `socket.socket` and friends;
- the guard prelude also refuses `open()` for writing outside the temporary folder and disables
  destructive calls (os.remove, os.system, subprocess, shutil.rmtree, ...), as HumanEval's own
  `reliability_guard` does. This guards against accidents of a model's code, not against code
  written to escape: it is not a security sandbox (run untrusted code in a container or VM).
- stdout is discarded; stderr is kept up to the file-size limit, its last line names the error.
- a sample passes only when the program ran to its end: its last statement exits with a status of its own
  (`PASS_STATUS`), so a completion that calls `exit()`, `sys.exit(0)` or `os._exit(0)` before the tests
  run fails (HumanEval's harness counts SystemExit as a failure too).
Samples run in parallel, up to the core count.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

from tqdm.auto import tqdm

GUARD = r"""
import builtins as _b, io as _io, os as _os, socket as _socket, shutil as _shutil, subprocess as _subprocess
def _deny(*args, **kwargs):
    raise PermissionError("disabled by deltatune's code-execution guard")
for _name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
    setattr(_socket, _name, _deny)
_root = _os.path.realpath(_os.getcwd())
_real_open = _b.open
def _open(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, bytes, _os.PathLike)) and any(c in mode for c in "wax+"):
        path = _os.path.realpath(_os.fsdecode(file))
        if path != _root and not path.startswith(_root + _os.sep):
            raise PermissionError(f"writing outside the sandbox folder is refused: {path}")
    return _real_open(file, mode, *args, **kwargs)
_b.open = _io.open = _open
for _name in ("system", "kill", "killpg", "fork", "forkpty", "putenv", "remove", "removedirs", "rmdir", "unlink",
              "rename", "renames", "replace", "truncate", "chmod", "chown", "lchown", "chdir", "fchdir",
              "setuid", "execv", "execve", "execvp", "spawnv", "popen", "posix_spawn", "posix_spawnp"):
    if hasattr(_os, _name):
        setattr(_os, _name, _deny)
_shutil.rmtree = _shutil.move = _shutil.chown = _deny
_subprocess.Popen = _subprocess.run = _subprocess.call = _deny
del _name
"""


PASS_STATUS = 97  # the exit status of a program that reached its end (0 means it left early)
# only in the program itself: a multiprocessing child re-imports the file as __mp_main__ and must run its target
_END = f"\nif __name__ == '__main__':\n    __deltatune_end__({PASS_STATUS})\n"


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock per sample
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file the sample may write (stderr included)


@dataclass
class Outcome:
    passed: bool
    status: str  # "passed" | "failed: <last stderr line>" | "timed out" | "killed by signal N"


@lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """Whether `unshare -rn` can start a process here (no network inside it)."""
    if not shutil.which("unshare"):
        return False
    try:
        return (
            subprocess.run(
                ["unshare", "-rn", sys.executable, "-I", "-c", "pass"], capture_output=True, timeout=20
            ).returncode
            == 0
        )
    except (OSError, subprocess.SubprocessError):
        return False


def isolation() -> str:
    """A one-line description of what this machine enforces, for results files."""
    net = "network namespace (unshare -rn) + socket guard" if network_namespace_available() else "socket guard only"
    return f"process per sample, empty temp dir, rlimits (memory, CPU, file size), wall timeout; no network: {net}"


def _limits_prelude(limits: Limits) -> str:
    """Set the resource limits as the sample's first statements: the process limits itself before any of the
    model's code runs (no preexec_fn, which is unsafe while the evaluator's threads run)."""
    mem, fsize = limits.memory_mb * 2**20, limits.file_mb * 2**20
    cpu = int(limits.timeout_s) + 1
    return (
        "import resource as _r\n"
        f"_r.setrlimit(_r.RLIMIT_AS, ({mem}, {mem}))\n"
        f"_r.setrlimit(_r.RLIMIT_CPU, ({cpu}, {cpu}))\n"
        f"_r.setrlimit(_r.RLIMIT_FSIZE, ({fsize}, {fsize}))\n"
        "_r.setrlimit(_r.RLIMIT_CORE, (0, 0))\n"
        "del _r\n"
        # the real exit, kept before the guard and the program can replace os._exit: the program's last line
        "from os import _exit as __deltatune_end__\n"
    )


def run_program(program: str, limits: Limits = Limits()) -> Outcome:
    """Run one program (guard prelude + the program) and say whether it ran to its end in time."""
    folder = tempfile.mkdtemp(prefix="deltatune-exec-")
    try:
        with open(os.path.join(folder, "sample.py"), "w", encoding="utf-8") as fh:
            fh.write(_limits_prelude(limits) + GUARD + "\n" + program + "\n" + _END)
        cmd = [sys.executable, "-I", "sample.py"]
        if network_namespace_available():
            cmd = ["unshare", "-rn", *cmd]
        with open(os.path.join(folder, "stderr.txt"), "wb") as err:
            proc = subprocess.Popen(
                cmd,
                cwd=folder,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
                env={
                    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "PYTHONHASHSEED": "0",
                    "HOME": folder,
                    "TMPDIR": folder,
                },
            )
            try:
                code = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)  # the sample and anything it started in its session
                return Outcome(False, "timed out")
            _kill_leftovers(proc.pid)  # a process the sample started and left running (its group outlives it)
        if code == PASS_STATUS:
            return Outcome(True, "passed")
        if code == 0:  # exit(), sys.exit(0), os._exit(0): the tests did not all run
            return Outcome(False, "failed: exited before the end of the tests (status 0)")
        if code < 0:
            return Outcome(False, f"killed by signal {-code}")
        return Outcome(False, "failed: " + _last_line(os.path.join(folder, "stderr.txt")))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the sample's session (its pid is the group id: it is still running, not yet reaped)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _kill_leftovers(group: int) -> None:
    """SIGKILL what is left of a finished sample's process group: children it started and did not wait for
    (the sample ends with os._exit, which does not join multiprocessing's children). The group id cannot be
    given to a new process while members of the group live, so this reaches only the sample's own."""
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _last_line(path: str) -> str:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - 2000))
        lines = [ln for ln in fh.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "exit status non-zero"


def run_programs(
    programs: list[str], limits: Limits = Limits(), workers: int | None = None, progress: bool = True
) -> list[Outcome]:
    """Outcomes in input order; up to `workers` (default: the core count) samples at a time."""
    workers = max(1, workers or os.cpu_count() or 1)
    network_namespace_available()  # probe once, before the threads start
    bar = tqdm(total=len(programs), desc="execute", unit="sample", disable=not progress or len(programs) < 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run_program, p, limits) for p in programs]
        out = []
        for f in futures:
            out.append(f.result())
            bar.update(1)
    bar.close()
    return out
