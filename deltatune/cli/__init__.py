"""`deltatune` command line: one module per command in this package, each with `add_parser`.

A command module defines `add_parser(subparsers)` that registers its sub-parser and sets
`func=run` where `run(args) -> int`. User mistakes raise `UserError` and become one line on
stderr with exit code 2. Besides those, only what is never a bug is caught: Ctrl-C (exit 130), a
reader that closed our output early (`deltatune preview ... | head -1`: quiet, exit 141, as a
process killed by SIGPIPE), and a file the user named that cannot be opened (permission denied, a
folder where a file is expected, a full or read-only disk: one line naming it, exit 2); everything
else keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from deltatune.errors import TrainingError, UserError

# Order here is the order in `deltatune --help`.
COMMANDS = [
    "demo",
    "train",
    "generate",
    "merge",
    "export",
    "plan",
    "preview",
    "stats",
    "eval",
    "forgetting",
    "analyze",
    "experiment",
    "data",
    "upcycle",
    "serve",
]


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit 2), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from deltatune import __version__

    parser = _OneLineParser(
        prog="deltatune", description="Instruction finetuning with delta-tuning methods, and what each choice costs."
    )
    parser.add_argument("--version", action="version", version=f"deltatune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"deltatune.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"deltatune.cli.{name}":
                continue  # command not built yet
            raise
        module.add_parser(sub)
    return parser


# A file the user named that cannot be used: their set-up, not a bug (OSError.filename names it).
_USER_OS_ERRORS = (PermissionError, IsADirectoryError, NotADirectoryError, FileNotFoundError)
_USER_ERRNOS = {errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _broken_output() -> bool:
    """Whether stdout or stderr is a pipe whose reader has gone (then a BrokenPipeError is that, not a bug).

    The streams are pointed at /dev/null, so that flushing them at exit cannot fail again."""
    broken = False
    for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
        try:
            import select

            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            gone = any(event & select.POLLERR for _, event in poller.poll(0))
        except (AttributeError, OSError, ValueError):  # no poll (Windows), or fd closed: try a flush
            try:
                stream.flush()
                gone = False
            except (AttributeError, OSError, ValueError):
                gone = True
        if gone:
            broken = True
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)
    return broken


def _stdout_failed() -> bool:
    """Whether stdout cannot take what it holds; if so it goes to /dev/null, so that exit cannot fail on it."""
    try:
        _flush_stdout()
        return False
    except OSError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
        return True


def _flush_stdout() -> None:
    if sys.stdout is not None:  # None when started with stdout closed
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    _tolerant_output()
    if argv is None:  # the process is this command (not a call from Python)
        _end_on_sigterm()
    try:
        return _main(argv)
    except BrokenPipeError:  # also one raised while reporting another error on a closed stderr
        if not _broken_output():
            raise  # a pipe of our own (a worker, a socket): a bug, keep its traceback
        return 141  # 128 + SIGPIPE, what a shell shows for `cat big | head -1`


def _end_on_sigterm() -> None:
    """SIGTERM (`timeout`, `docker stop`, Slurm) ends the command through the handlers that remove half-written
    temporary folders (an export killed so left a hidden 254 MB one that nothing removed); exit 143. Training
    handles it as Ctrl-C: it finishes the step and saves a checkpoint first."""
    import signal
    import threading

    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: torchrun's shutdown sends SIGTERM, end at once
        return
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def _tolerant_output() -> None:
    """On a terminal or pipe that is not UTF-8 (LANG=en_US.ISO-8859-1, PYTHONIOENCODING=ascii, a Windows
    console), a character it cannot show is written as a \\x.. escape instead of ending the command with a
    UnicodeEncodeError: previews, generations and eval samples print the data's text as it is."""
    import codecs

    for stream in (sys.stdout, sys.stderr):
        encoding = getattr(stream, "encoding", None)
        try:
            utf = encoding is not None and codecs.lookup(encoding).name.startswith("utf")
        except LookupError:
            utf = False
        if not utf and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def _main(argv: list[str] | None) -> int:
    name = "deltatune"
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit:  # --help, --version, a bad flag: flushed here so a closed reader is caught
            _flush_stdout()
            raise
        args.argv = list(sys.argv[1:] if argv is None else argv)  # as given (experiment --jobs restarts it)
        if not getattr(args, "func", None):
            parser.print_help()
            _flush_stdout()
            return 2
        name = f"deltatune {args.command}"
        try:
            code = int(args.func(args) or 0)
        finally:
            _flush_stdout()  # here, not at exit: a reader that went away is then reported like the rest
        return code
    except UserError as exc:
        from deltatune.experiments.common import WORKER_ENV

        worker = os.environ.get(WORKER_ENV, "").split("/")[0]  # an experiment's --jobs worker
        print(f"{f'(worker {worker}) ' if worker else ''}{name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except TrainingError as exc:
        print(f"{name}: stopped: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise  # main's
    except OSError as exc:
        full = exc.errno in _USER_ERRNOS  # a full or read-only disk: no file named when it is our stdout
        if not (full or (isinstance(exc, _USER_OS_ERRORS) and exc.filename is not None)):
            raise
        _stdout_failed()
        where = f"{exc.filename}: " if exc.filename is not None else ""
        print(f"{name}: error: {where}{(exc.strerror or str(exc)).lower()}", file=sys.stderr)
        return 2
