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
- the guard prelude also refuses, outside the temporary folder, `open()` / `io.FileIO` / `os.open` for
  writing, `os.mkdir` / `os.makedirs`, removing and renaming (os.remove, os.rename, shutil.rmtree, ...:
  allowed inside, where tempfile needs them), links and `sqlite3.connect`, each in `os` and in `posix`
  (which os copies them from), and disables os.system, subprocess, os.fork and the like, as HumanEval's
  own `reliability_guard` does. This guards against accidents of a model's code, not against code
  written to escape (ctypes): it is not a security sandbox (run untrusted code in a container or VM).
- numeric libraries import: the child's environment sets what numpy would otherwise `os.putenv`
  (`OPENBLAS_MAIN_FREE`; the guard keeps putenv disabled) and one BLAS/OpenMP thread per sample.
- stdout is discarded; stderr is kept up to the file-size limit, its last line names the error.
- a sample passes only when the program ran to its end: its last statement writes a per-run random token to
  a pipe only the harness reads, then exits with `PASS_STATUS`; both are needed, so `exit()`, `sys.exit(0)`
  or `sys.exit(PASS_STATUS)` before the tests run fails (HumanEval's harness counts SystemExit as a failure).
Samples run in parallel, up to the core count; Ctrl-C cancels the queued samples and kills the running ones.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

from tqdm.auto import tqdm

GUARD = r"""
import builtins as _b, io as _io, os as _os, socket as _socket, shutil as _shutil, subprocess as _subprocess
try:
    import posix as _posix  # os copies its functions from posix: each is replaced in both
except ImportError:
    _posix = None
_modules = (_os,) if _posix is None else (_os, _posix)
def _replace(name, make):
    for _m in _modules:
        if hasattr(_m, name):
            setattr(_m, name, make(getattr(_m, name)))
def _deny(*args, **kwargs):
    raise PermissionError("disabled by deltatune's code-execution guard")
for _name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
    setattr(_socket, _name, _deny)
_root = _os.path.realpath(_os.getcwd())
# refuse a path outside the folder. dir_fd: the path is relative to that open folder (shutil.rmtree walks so);
# follow=False: the entry itself is what changes (removing or renaming a link leaves its target alone)
def _inside(file, dir_fd=None, follow=True):
    if isinstance(file, (str, bytes, _os.PathLike)):
        name = _os.fsdecode(file)
        if dir_fd is not None and not _os.path.isabs(name):
            try:
                name = _os.path.join(_os.readlink(f"/proc/self/fd/{dir_fd}"), name)
            except (OSError, TypeError):
                name = None
        if name is not None:
            if follow:
                path = _os.path.realpath(name)
            else:
                head, tail = _os.path.split(_os.path.abspath(name))
                path = _os.path.join(_os.path.realpath(head), tail)
            if path.startswith(_root + _os.sep) or (follow and path == _root):
                return
    elif isinstance(file, int) and dir_fd is None:
        return  # an open file descriptor: one opened for writing passed this check when it was opened
    raise PermissionError(f"writing outside the sandbox folder is refused: {file!r}")
_real_open = _b.open
def _open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+"):
        _inside(file)
    return _real_open(file, mode, *args, **kwargs)
_b.open = _io.open = _open
class _FileIO(_io.FileIO):
    def __init__(self, file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            _inside(file)
        super().__init__(file, mode, *args, **kwargs)
_io.FileIO = _FileIO
def _guarded(real, which=(0,), follow=True):
    def call(*args, **kwargs):
        for i in which:
            if i < len(args):
                fd = kwargs.get("src_dir_fd" if i == 0 and len(which) > 1 else "dst_dir_fd") or kwargs.get("dir_fd")
                _inside(args[i], fd, follow)
        return real(*args, **kwargs)
    return call
_WRITE_FLAGS = _os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_TRUNC | _os.O_APPEND
def _guarded_open(real):
    def call(path, flags, *args, **kwargs):
        if flags & _WRITE_FLAGS:  # reading is not restricted
            _inside(path, kwargs.get("dir_fd"))
        return real(path, flags, *args, **kwargs)
    return call
_replace("open", _guarded_open)  # tempfile, and code below open()
# os.makedirs and Path.mkdir call mkdir; removing and renaming inside the folder is allowed (tempfile does both)
for _name in ("mkdir", "mkfifo", "mknod", "truncate"):
    _replace(_name, _guarded)
for _name in ("remove", "unlink", "rmdir"):
    _replace(_name, lambda real: _guarded(real, follow=False))
for _name in ("rename", "replace"):
    _replace(_name, lambda real: _guarded(real, (0, 1), follow=False))
# a symlink's target may lie outside (writing through it is checked), a hard link's may not
_replace("symlink", lambda real: _guarded(real, (1,)))
_replace("link", lambda real: _guarded(real, (0, 1)))
try:
    import sqlite3 as _sqlite3
except ImportError:
    _sqlite3 = None
if _sqlite3 is not None:
    _real_connect = _sqlite3.connect
    def _connect(database, *args, **kwargs):
        name = _os.fsdecode(database) if isinstance(database, (str, bytes, _os.PathLike)) else database
        if isinstance(name, str) and name.startswith("file:") and kwargs.get("uri"):
            name, _, query = name[5:].partition("?")
            if "mode=memory" in query or "mode=ro" in query:
                name = ":memory:"
        if name not in (":memory:", ""):
            _inside(name)
        return _real_connect(database, *args, **kwargs)
    _sqlite3.connect = _connect
for _name in ("system", "kill", "killpg", "fork", "forkpty", "putenv", "removedirs", "renames", "chmod", "chown",
              "lchown", "chdir", "fchdir", "setuid", "execv", "execve", "execvp", "spawnv", "popen", "posix_spawn",
              "posix_spawnp"):
    _replace(_name, lambda real: _deny)
_shutil.rmtree = _guarded(_shutil.rmtree, follow=False)  # its walk goes through the guarded removals above
_shutil.move = _shutil.chown = _deny
_subprocess.Popen = _subprocess.run = _subprocess.call = _deny
del _name
"""


PASS_STATUS = 97  # the exit status of a program that reached its end (0 means it left early)
# only in the program itself: a multiprocessing child re-imports the file as __mp_main__ and must run its target
# the last line calls the end function under a name drawn per sample, so that no completion calls it by a known name
_END = "\nif __name__ == '__main__':\n    {end}()\n"
_TOKEN_ENV, _FD_ENV = "DELTATUNE_EXEC_TOKEN", "DELTATUNE_EXEC_FD"
# numpy 2 calls os.putenv('OPENBLAS_MAIN_FREE') at import unless it is set: set it, and one BLAS/OpenMP thread
# per sample (samples already run one per core; a thread pool per sample would also eat the address-space limit)
_CHILD_ENV = {
    "OPENBLAS_MAIN_FREE": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


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


def _limits_prelude(limits: Limits, end: str = "__deltatune_end__") -> str:
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
        # the program's last line: the run's token to the harness's pipe, then the real exit, both kept before the
        # guard and the program can replace them; the token leaves the environment before the model's code runs
        "import os as _o\n"
        f"def {end}(_w=_o.write, _x=_o._exit, _fd=int(_o.environ.pop('{_FD_ENV}', '-1')),\n"
        f"        _t=_o.environ.pop('{_TOKEN_ENV}', '').encode()):\n"
        "    try:\n"
        "        _w(_fd, _t)\n"
        "    except OSError:\n"
        "        pass\n"
        f"    _x({PASS_STATUS})\n"
        "del _o\n"
    )


class _Batch:
    """The running samples of one `run_programs` call, so that Ctrl-C can kill their process groups; once
    stopped, a sample that starts late kills itself at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        self.stopped = False

    def add(self, proc: subprocess.Popen) -> bool:
        with self.lock:
            if not self.stopped:
                self.running.add(proc)
        return not self.stopped

    def discard(self, proc: subprocess.Popen) -> None:
        with self.lock:
            self.running.discard(proc)

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            running = list(self.running)
        for proc in running:
            _signal_group(proc.pid)


def run_program(program: str, limits: Limits = Limits(), batch: _Batch | None = None) -> Outcome:
    """Run one program (guard prelude + the program) and say whether it ran to its end in time."""
    folder = tempfile.mkdtemp(prefix="deltatune-exec-")
    read_end, write_end = os.pipe()  # the passing sample's token comes back here, not through its exit status
    token = secrets.token_hex(16)
    try:
        with open(os.path.join(folder, "sample.py"), "w", encoding="utf-8") as fh:
            end = f"_end_{secrets.token_hex(8)}"
            fh.write(_limits_prelude(limits, end) + GUARD + "\n" + program + "\n" + _END.format(end=end))
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
                pass_fds=(write_end,),
                env={
                    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "PYTHONHASHSEED": "0",
                    "HOME": folder,
                    "TMPDIR": folder,
                    **_CHILD_ENV,
                    _TOKEN_ENV: token,
                    _FD_ENV: str(write_end),
                },
            )
            os.close(write_end)
            write_end = -1
            if batch is not None and not batch.add(proc):
                _kill_group(proc)
                return Outcome(False, "cancelled")
            try:
                code = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)  # the sample and anything it started in its session
                return Outcome(False, "timed out")
            finally:
                if batch is not None:
                    batch.discard(proc)
            _kill_leftovers(proc.pid)  # a process the sample started and left running (its group outlives it)
        return _outcome(code, _read_token(read_end) == token.encode(), os.path.join(folder, "stderr.txt"))
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
        shutil.rmtree(folder, ignore_errors=True)


def _read_token(fd: int) -> bytes:
    """What the sample wrote to its pipe (the token if it reached its end), without waiting for more."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 256)
    except BlockingIOError:
        return b""


def _outcome(code: int, reached_end: bool, stderr_path: str) -> Outcome:
    """Passed only with both the pass status and the token: an exit status alone (`sys.exit(97)`) is forgeable."""
    if code == PASS_STATUS and reached_end:
        return Outcome(True, "passed")
    if code in (0, PASS_STATUS):  # exit(), sys.exit(0), sys.exit(97), os._exit(0): the tests did not all run
        return Outcome(False, f"failed: exited before the end of the tests (status {code})")
    if code < 0:
        return Outcome(False, f"killed by signal {-code}")
    return Outcome(False, "failed: " + _last_line(stderr_path))


def _signal_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the sample's session (its pid is the group id: it is still running, not yet reaped)."""
    _signal_group(proc.pid)
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
    """Outcomes in input order; up to `workers` (default: the core count) samples at a time.

    On Ctrl-C (or any exception while waiting) the queued samples are cancelled and the running ones' process
    groups killed before it propagates: the pool's own exit would otherwise run every queued sample first."""
    workers = max(1, workers or os.cpu_count() or 1)
    network_namespace_available()  # probe once, before the threads start
    bar = tqdm(total=len(programs), desc="execute", unit="sample", disable=not progress or len(programs) < 2)
    batch = _Batch()
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = [pool.submit(run_program, p, limits, batch) for p in programs]
        out = []
        for f in futures:
            out.append(f.result())
            bar.update(1)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        batch.stop()
        raise
    finally:
        pool.shutdown(wait=True)  # after a stop, only the killed samples' threads remain: they end at once
        bar.close()
    return out
