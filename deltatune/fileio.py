"""Atomic writes, and the checks that keep outputs from ever replacing what a user owns.

`atomic_dir` builds a folder under a temporary name and renames it into place: a crash (even
SIGKILL) at any moment leaves either the old folder or the new one, never a half-written one;
temporary folders start with a dot and are ignored by readers. `check_output` runs before any
work: an output that exists and is not empty is refused unless the user said --overwrite, and an
output that is, holds or lies inside something the command reads (model, adapter, data) is
refused even then.
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping

from deltatune.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_dir(path: Path) -> list[Path]:
    """mkdir -p with the user's umask (tempfile.mkdtemp would make 0700 folders); returns the folders it
    created, deepest first, so that a failed write can remove them again."""
    created = []
    for folder in (path, *path.parents):
        if os.path.lexists(folder):
            break
        created.append(folder)
    path.mkdir(parents=True, exist_ok=True)
    return created


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed write created (deepest first), each only while still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _follow_umask(root: Path) -> None:
    """Give every file under `root` the mode the umask gives a new file: safetensors (0.8) writes its files 0600
    whatever the umask, so a shared model's or adapter's weights were unreadable beside its readable config."""
    mask = _umask()
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            executable = os.stat(path).st_mode & 0o111
            os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then the folders, to disk: without it, a power cut soon after the rename
    can leave the new name holding empty or partial files."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not on every platform (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block ends: between the two renames of a swap, an interrupt would have
    removed both the old folder and the new one."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Replace what `out_dir` is (a folder or file) by `tmp`; if that fails, the old one is put back."""
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
    try:
        with _signals_held():
            _rename_pair(tmp, out_dir, old)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _rename_pair(tmp: Path, out_dir: Path, old: Path) -> None:
    """`out_dir` into `old`, then `tmp` into `out_dir` (the old one put back if the second fails)."""
    try:
        os.replace(out_dir, old / "x")
    except FileNotFoundError:  # removed meanwhile (another writer's swap): the name is free
        os.replace(tmp, out_dir)
        return
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if not os.path.lexists(out_dir):
            os.replace(old / "x", out_dir)
        raise


# what a write killed before its rename leaves beside its target NAME: atomic_dir's folder `.NAME.tmp.XXXXXXXX`,
# _swap_in's `.NAME.old.XXXXXXXX` (tempfile's eight random characters) and remove_dir's `.NAME.del.XXXXXXXX`.
# write_text_atomic's small `.NAME.XXXXXXXX` files are left alone: that pattern also fits names a user might
# choose (`.config.yaml.original`).
_LEFT_BY_A_KILL = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old|del)\.[a-z0-9_]{8}")


def remove_interrupted_writes(folder: str | os.PathLike, names: Callable[[str], bool]) -> list[Path]:
    """Remove the temporary folders that writes killed mid-way left in `folder` (a process killed before its rename
    cannot clean up: a half-written checkpoint can be as large as the model and its optimizer state), for targets
    whose NAME `names` accepts. A previous version that a kill caught between the two renames of a swap is put back when
    its name is free. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        m = _LEFT_BY_A_KILL.fullmatch(entry.name)
        if not m or not names(m["name"]) or entry.is_symlink() or not entry.is_dir():
            continue
        if m["kind"] == "old" and (entry / "x").exists() and not os.path.lexists(folder / m["name"]):
            os.replace(entry / "x", folder / m["name"])
        shutil.rmtree(entry)
        removed.append(entry)
    return removed


def remove_dir(path: str | os.PathLike) -> None:
    """Remove a folder so that a kill at any moment leaves it whole or gone, never a part of it that a reader takes
    for the whole (a checkpoint without its meta.json): renamed aside first, to a name `remove_interrupted_writes`
    knows, then deleted."""
    path = Path(path)
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.del.", dir=path.parent))
    os.replace(path, aside / "x")
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `out_dir` (a previous folder is removed).

    Callers that may replace a user's folder check it first with `check_output`."""
    out_dir = Path(out_dir)
    created = _make_dir(out_dir.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp.", dir=out_dir.parent))
    except BaseException:
        _remove_empty(created)
        raise
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # as mkdir would have made it
        yield tmp
        _follow_umask(tmp)
        _fsync_tree(tmp)
        try:
            if os.path.lexists(out_dir):
                _swap_in(tmp, out_dir)
            else:
                try:
                    os.replace(tmp, out_dir)
                except OSError:
                    if not os.path.lexists(out_dir):
                        raise
                    _swap_in(tmp, out_dir)  # another writer put one there since the check: the last one wins
        except OSError as exc:  # named by the user's path, not the temporary folder's
            raise UserError(f"{out_dir}: cannot put the result there ({exc.strerror or exc})") from None
        _fsync_dir(out_dir.parent)
    except BaseException as exc:
        disk = _disk_error(exc, tmp, out_dir)  # before the temporary folder goes, freeing what it took
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        if disk is not None:
            raise disk from exc
        raise


# Rust's io::Error as safetensors words it: "... No space left on device (os error 28)"
_OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)")
_DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}
FULL_BELOW = 1 << 20  # bytes left on the disk under which torch.save's failed write is taken for a full disk
_TORCH_SAVE_CUT_SHORT = "unexpected pos"  # torch.save's zip writer when a write came up short


def _free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def _disk_error(exc: BaseException, tmp: Path, out_dir: Path) -> OSError | None:
    """A write into `tmp` that failed because the disk is full or read-only, as the OSError it is, named by the
    user's `out_dir` (the CLI's one-line error); None for any other failure. safetensors raises its own error
    type and `torch.save` a RuntimeError ("unexpected pos ..."), neither an OSError: the first names the errno
    in its text, the second is taken for a full disk only where the disk has (almost) no space left."""
    if not isinstance(exc, Exception) or isinstance(exc, UserError):  # a UserError says what it is already
        return None
    if isinstance(exc, OSError):
        code = exc.errno
    elif found := _OS_ERROR_TEXT.search(str(exc)):
        code = int(found.group(1))
    elif isinstance(exc, RuntimeError) and _TORCH_SAVE_CUT_SHORT in str(exc):  # nothing else of the free space:
        try:  # a root process sees none available on a 95% full disk, and any other failure is its own
            code = errno.ENOSPC if _free_bytes(tmp) < FULL_BELOW else None
        except OSError:
            code = None
    else:
        code = None
    if code not in _DISK_ERRNOS:
        return None
    return OSError(code, os.strerror(code), str(out_dir))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write via a temporary file in the same folder and os.replace: no half-written file, ever."""
    return write_file_atomic(path, lambda fh: fh.write(text.encode("utf-8")))


def write_file_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """`write(binary file)` into a temporary file beside `path`, fsynced, then renamed over it; the file gets the
    mode the umask gives (mkstemp's 0600 left plots unreadable beside their readable tables)."""
    path = Path(path)
    created = _make_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        _remove_empty(created)
        raise
    return path


def unreadable_safetensors(path: str | os.PathLike, exc: BaseException, field: str) -> UserError:
    """The one line for a weights file safetensors cannot read (its own error type, a file cut short, OSError)."""
    return UserError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:80]})", field=field)


def safetensors_header(path: str | os.PathLike, *, field: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor: (dtype, shape)} of a safetensors file, from its header alone (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            slices = {key: fh.get_slice(key) for key in fh.keys()}
            return {key: (s.get_dtype(), tuple(s.get_shape())) for key, s in slices.items()}
    except Exception as exc:
        raise unreadable_safetensors(path, exc, field) from None


def strict_json(value: Any) -> Any:
    """`value` with every NaN or infinite float made None: json.dumps writes them as NaN/Infinity, which jq,
    JavaScript and other strict readers refuse (a measure never computed, a fit of fewer than two points)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def overlaps(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True if `a` and `b` are the same path or one lies inside the other (symlinks resolved)."""
    ra, rb = _real(a), _real(b)
    return ra == rb or ra in rb.parents or rb in ra.parents


def check_writable(out: str | os.PathLike, *, field: str) -> None:
    """`out` (a folder or file to be created) can be written: its nearest existing ancestor is a
    writable folder. Checked before any work, so a read-only place fails at once."""
    p = Path(out).expanduser().absolute()
    if p.exists() and p.is_dir():
        probe = p
    else:
        probe = p.parent
        while not probe.exists():
            probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{out}: cannot be created, {probe} is not a folder", field=field)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{out}: cannot write there ({probe} is not writable)", field=field)


def check_output(
    out: str | os.PathLike,
    *,
    overwrite: bool,
    reads: Mapping[str, str | os.PathLike | None],
    field: str = "out",
    want_dir: bool = True,
) -> Path:
    """Refuse an output that would destroy something: one that overlaps what is read (never allowed),
    or one that exists and is not empty (allowed with `overwrite`). Also checks writability."""
    for what, path in reads.items():
        if path is not None and Path(path).expanduser().exists() and overlaps(out, path):
            raise UserError(
                f"{out} would replace or lie inside the {what} being read ({path}); choose another "
                f"path (--overwrite never allows this)",
                field=field,
            )
    p = Path(out).expanduser()
    here = Path.cwd().resolve()
    if p.exists() and (p.resolve() == here or p.resolve() in here.parents):
        raise UserError(
            f"{out} is the current folder or holds it, which cannot be replaced; choose a new folder", field=field
        )
    if p.exists() or p.is_symlink():
        empty_dir = p.is_dir() and not any(p.iterdir())
        if not empty_dir and not overwrite:
            kind = "folder" if p.is_dir() else "file"
            raise UserError(
                f"{out}: a {kind} that exists{' and is not empty' if p.is_dir() else ''}; choose "
                f"another path or pass --overwrite to replace it",
                field=field,
            )
        if want_dir and not p.is_dir() and not overwrite:
            raise UserError(f"{out}: exists and is not a folder", field=field)
    check_writable(out, field=field)
    return p
