"""Outputs never half-written (fifth review): each test failed before its fix."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def test_export_to_the_current_folder_is_one_line_before_the_model_loads(tiny_dir, tmp_path, monkeypatch, capsys):
    """`deltatune export --out . --overwrite` loaded the model, wrote it, then failed to replace the current folder
    with an OSError traceback."""
    from deltatune import models
    from deltatune.cli import main

    here = tmp_path / "work"
    here.mkdir()
    (here / "userfile").write_text("keep")
    monkeypatch.chdir(here)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model before the check"))
    for out in (".", ".."):
        assert main(["export", "--model", str(tiny_dir), "--out", out, "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "is the current folder or holds it" in err and len(err.strip().splitlines()) == 1, err
    assert (here / "userfile").read_text() == "keep"


def test_sigterm_ends_a_command_through_its_cleanup(tmp_path):
    """A SIGTERM (timeout, docker stop, Slurm) killed an export at once, leaving a hidden half-written temporary
    folder beside --out that nothing removed; it now ends the command as Ctrl-C does (exit 143, folder removed)."""
    script = textwrap.dedent(
        f"""
        import os, signal, time
        from pathlib import Path
        from deltatune.cli import _end_on_sigterm
        from deltatune.fileio import atomic_dir

        _end_on_sigterm()
        with atomic_dir(Path({str(tmp_path / "out")!r})) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == 143, done.stderr.decode()
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary folder


def test_a_failed_final_rename_names_the_users_path(tmp_path, monkeypatch):
    """When the last rename failed, the error named the internal temporary folder (`.out.tmp.xxxx`)."""
    import os

    from deltatune.errors import UserError
    from deltatune.fileio import atomic_dir

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(UserError, match=r"out: cannot put the result there \(Permission denied\)") as exc:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "x").write_text("1")
    assert ".tmp." not in str(exc.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("writer", ["atomic_dir", "write_text_atomic"])
def test_a_failed_write_removes_the_folders_it_created(tmp_path, writer):
    """A write that fails leaves the disk as it found it: the parent folders it made for the output went too
    (an empty `runs/new/` stayed behind), while a folder that existed before, even empty, stays."""
    from deltatune import fileio

    existing = tmp_path / "existing"
    existing.mkdir()
    target = existing / "a" / "b" / "out"
    with pytest.raises(RuntimeError, match="stopped"):
        if writer == "atomic_dir":
            with fileio.atomic_dir(target) as tmp:
                (tmp / "x").write_text("1")
                raise RuntimeError("stopped")
        else:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(fileio.os, "fsync", lambda fd: (_ for _ in ()).throw(RuntimeError("stopped")))
                fileio.write_text_atomic(target, "text")
    assert existing.is_dir() and list(existing.iterdir()) == []
