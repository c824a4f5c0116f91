"""The command-line layer (deltatune/cli/__init__.py): a closed reader, Ctrl-C, --version, and files the user
named that cannot be used end quietly or in one line, never in a traceback."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

import deltatune.cli
from deltatune import __version__

REPO = Path(__file__).resolve().parent.parent


def _into_closed_pipe(args: list[str]) -> subprocess.CompletedProcess:
    """Run `deltatune ARGS | head -0`: stdout is a pipe whose reader is already gone."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, "-m", "deltatune", *args], stdout=write, stderr=subprocess.PIPE, cwd=REPO, text=True
        )
    finally:
        os.close(write)


@pytest.mark.parametrize(
    "extra",
    [["preview", "--limit", "2"], ["preview", "--format", "json"], ["stats", "--format", "json"], ["stats"]],
    ids=["preview", "preview-json", "stats-json", "stats"],
)
def test_output_into_a_closed_pipe_ends_quietly(data_file, extra):
    proc = _into_closed_pipe([*extra, "--data", str(data_file), "--tokenizer", "tiny"])
    assert proc.returncode == 141, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_generate_into_a_closed_pipe_ends_quietly(tiny_dir):
    proc = _into_closed_pipe(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--max-new-tokens", "2"])
    assert proc.returncode == 141, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_ctrl_c_while_the_commands_load_is_one_line(monkeypatch, capsys):
    def build_parser():
        raise KeyboardInterrupt  # Ctrl-C during the imports of build_parser

    monkeypatch.setattr(deltatune.cli, "build_parser", build_parser)
    try:
        code = deltatune.cli.main(["stats", "--data", "x"])
    except KeyboardInterrupt:  # not let through: pytest would take it for its own Ctrl-C and stop
        pytest.fail("KeyboardInterrupt escaped main")
    assert code == 130
    assert capsys.readouterr().err == "deltatune: interrupted\n"


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        deltatune.cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"deltatune {__version__}\n"


@pytest.mark.parametrize(
    "error, line",
    [
        (
            PermissionError(errno.EACCES, "Permission denied", "/data/dénöt.jsonl"),
            "deltatune plan: error: /data/dénöt.jsonl: permission denied\n",
        ),
        (
            IsADirectoryError(errno.EISDIR, "Is a directory", "/data/folder"),
            "deltatune plan: error: /data/folder: is a directory\n",
        ),
        (OSError(errno.ENOSPC, "No space left on device"), "deltatune plan: error: no space left on device\n"),
    ],
    ids=["permission", "directory", "disk-full"],
)
def test_a_file_that_cannot_be_used_is_one_line(monkeypatch, capsys, error, line):
    def run(args):
        raise error

    monkeypatch.setattr("deltatune.cli.plan.run", run)
    assert deltatune.cli.main(["plan"]) == 2
    assert capsys.readouterr().err == line

    # what is not the user's doing keeps its traceback: other OS errors, a broken pipe that is not our output
    for bug in (OSError(errno.EIO, "Input/output error"), BrokenPipeError(errno.EPIPE, "Broken pipe")):

        def run(args, bug=bug):
            raise bug

        monkeypatch.setattr("deltatune.cli.plan.run", run)
        with pytest.raises(type(bug)):
            deltatune.cli.main(["plan"])


def test_an_unreadable_data_file_is_one_line(monkeypatch, capsys, tmp_path):
    data = tmp_path / "dénöt.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    real_open = Path.open

    def no_read(self, *args, **kwargs):  # chmod 000 would not stop root
        if self == data:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", no_read)
    assert deltatune.cli.main(["stats", "--data", str(data), "--tokenizer", "tiny"]) == 2
    assert capsys.readouterr().err == f"deltatune stats: error: {data}: permission denied\n"


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_text_the_terminal_cannot_show_is_escaped_not_a_traceback(tmp_path, encoding):
    """A stdout that is not UTF-8 (PYTHONIOENCODING, a latin-1 locale, a Windows console): a preview of data
    with characters it cannot encode prints them as escapes and succeeds."""
    data = tmp_path / "accents.jsonl"
    data.write_text('{"instruction": "Résumé café", "output": "Ça va ✓"}\n', encoding="utf-8")
    env = {**os.environ, "PYTHONIOENCODING": encoding}
    proc = subprocess.run(
        [sys.executable, "-m", "deltatune", "preview", "--data", str(data), "--tokenizer", "tiny"],
        capture_output=True, cwd=REPO, env=env,
    )  # fmt: skip
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr
    assert b"\\u2713" in proc.stdout  # the check mark, which neither encoding has
