"""The code-execution guard at the level below open(): os.open with write flags, and the posix module that os
copies its functions from, which reached a user's files past every guarded name in os."""

import pytest

from deltatune.evaluate.execution import Limits, run_program

FAST = Limits(timeout_s=10.0)


@pytest.mark.parametrize(
    "code",
    [
        "import os\nos.close(os.open({path!r}, os.O_WRONLY | os.O_CREAT))",
        "import os\nos.close(os.open({path!r}, os.O_RDWR | os.O_TRUNC))",
        "import os\nos.close(os.open({path!r}, os.O_WRONLY | os.O_APPEND))",
        "import os\nos.close(os.open({path!r}, os.O_RDONLY | os.O_TRUNC))",  # truncates although read-only
        "import posix\nposix.close(posix.open({path!r}, posix.O_WRONLY | posix.O_TRUNC))",
        "import posix\nposix.unlink({path!r})",
        "import posix\nposix.remove({path!r})",
        "import posix\nposix.rename({path!r}, {path!r} + '.moved')",
        "import posix\nposix.truncate({path!r}, 0)",
    ],
)
def test_low_level_writes_to_a_users_file_are_refused(tmp_path, code):
    users_file = tmp_path / "results.json"
    users_file.write_text("the user's numbers")
    out = run_program(code.format(path=str(users_file)), FAST)
    assert not out.passed and ("refused" in out.status or "disabled" in out.status), out.status
    assert users_file.read_text() == "the user's numbers"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_os_open_creating_a_file_outside_is_refused(tmp_path):
    target = tmp_path / "outside"
    code = "import os\nos.close(os.open({path!r}, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))"
    out = run_program(code.format(path=str(target)), FAST)
    assert not out.passed and "refused" in out.status
    assert not target.exists()


def test_reads_and_writes_inside_the_folder_and_temporary_files_still_work(tmp_path):
    readable = tmp_path / "data.txt"
    readable.write_text("42")
    code = (
        "import os, posix, tempfile\n"
        f"fd = os.open({str(readable)!r}, os.O_RDONLY)\nassert os.read(fd, 2) == b'42'\nos.close(fd)\n"
        "fd = os.open('mine', os.O_WRONLY | os.O_CREAT | os.O_TRUNC)\nos.write(fd, b'x')\nos.close(fd)\n"
        "posix.close(posix.open('mine', posix.O_RDWR | posix.O_APPEND))\n"
        "with tempfile.NamedTemporaryFile('w') as fh:\n    fh.write('t')\n"
        "fd, name = tempfile.mkstemp()\nos.close(fd)\n"
        "with tempfile.TemporaryDirectory() as d:\n    open(os.path.join(d, 'f'), 'w').close()\n"
    )
    out = run_program(code, FAST)
    assert out.passed, out.status


@pytest.mark.parametrize(
    "code",
    [
        "import shutil\nshutil.rmtree({folder!r})",
        "import os\nos.rename('mine', {folder!r} + '/moved')",
        "import os\nfd = os.open({folder!r}, os.O_RDONLY)\nos.unlink('results.json', dir_fd=fd)",
        "import os\nfd = os.open({folder!r}, os.O_RDONLY)\nos.rename('mine', 'results.json', dst_dir_fd=fd)",
    ],
)
def test_removing_and_renaming_reach_only_the_samples_folder(tmp_path, code):
    """Removal is allowed inside the folder (tempfile needs it) and through a folder descriptor (shutil.rmtree's
    walk): both are checked against the folder, by the path the descriptor resolves to."""
    users = tmp_path / "users"
    users.mkdir()
    (users / "results.json").write_text("the user's numbers")
    out = run_program("open('mine', 'w').close()\n" + code.format(folder=str(users)), FAST)
    assert not out.passed and "refused" in out.status, out.status
    assert sorted(p.name for p in users.iterdir()) == ["results.json"]
    assert (users / "results.json").read_text() == "the user's numbers"


def test_a_link_inside_to_a_users_folder_is_removed_not_followed(tmp_path):
    users = tmp_path / "users"
    users.mkdir()
    (users / "results.json").write_text("the user's numbers")
    code = (
        "import os, shutil\n"
        f"os.symlink({str(users)!r}, 'link')\nos.unlink('link')\n"
        f"os.makedirs('tree/sub')\nos.symlink({str(users)!r}, 'tree/sub/link')\nopen('tree/f', 'w').close()\n"
        "shutil.rmtree('tree')\nassert not os.path.exists('tree')\n"
    )
    out = run_program(code, FAST)
    assert out.passed, out.status
    assert (users / "results.json").read_text() == "the user's numbers"
