"""Writing engine directories so that nothing is lost or half-written.

A directory is built in a temporary sibling named after this process (``.OUT.partial-PID-…``) and put
in place with one rename at the end. One writer per OUT at a time (a lock file beside it); without
--overwrite the final rename never replaces an existing directory, so of two racing writers exactly
one wins; --overwrite replaces only a diffscore engine directory. Temporary folders left by a killed
process are removed by the next run.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from diffscore.engine.manifest import MANIFEST_NAME
from diffscore.errors import EngineError

log = logging.getLogger("diffscore")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(folder: Path, prefix: str) -> list[Path]:
    """Remove `prefix<PID>-…` / `prefix<PID>` folders in `folder` whose process is gone."""
    removed = []
    if not folder.is_dir():
        return removed
    pattern = re.compile(re.escape(prefix) + r"(\d+)(?:-.*)?$")
    for path in folder.iterdir():
        m = pattern.match(path.name)
        if m and path.is_dir() and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d temporary folder(s) left by killed runs in %s", len(removed), folder)
    return removed


def temp_dir(folder: Path, prefix: str) -> Path:
    """A private temporary folder `prefix<PID>-…` in `folder` (after removing stale ones of dead runs)."""
    remove_stale(folder, prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=folder))


@contextmanager
def exclusive(path: Path, what: str = "writing"):
    """One diffscore process at a time per `path` (a lock file beside it); a second one is refused in one line."""
    lock_path = path.parent / f".{path.name}.lock"
    try:
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as e:  # a read-only, full or forbidden folder: before any work, one line
        raise EngineError(f"cannot create the lock file {lock_path} ({e.strerror or e}): the folder {path.parent} "
                          f"must be writable for {what} {path.name}; use a copy in a writable folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)  # the holder's lock file stays
        raise EngineError(f"another diffscore process is {what} {path} right now; wait for it to finish") from None
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)


def check_replaceable(out_dir: Path, overwrite: bool) -> None:
    """Refuse, before any work, to write over anything but an engine directory (and that only with overwrite)."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not overwrite:
        raise EngineError(f"{out_dir} already exists; pass --overwrite to replace it")
    if out_dir.is_symlink() or not out_dir.is_dir() or not (out_dir / MANIFEST_NAME).is_file():
        raise EngineError(f"{out_dir} is not a diffscore engine directory (no {MANIFEST_NAME}); --overwrite replaces "
                          f"only "
                          "engine directories: choose another output path")


def written_by_us(path, out_dir: Path) -> bool:
    """Whether `path` is one of the places a build of `out_dir` writes: the directory itself, or its lock,
    temporary and old siblings (`.OUT.*`)."""
    path, out_dir = Path(path).absolute(), out_dir.absolute()
    return (path == out_dir or out_dir in path.parents or path == out_dir.parent
            or (path.parent == out_dir.parent and path.name.startswith(f".{out_dir.name}.")))


@contextmanager
def disk_errors(out_dir: Path):
    """A full, read-only or forbidden disk is one line naming the path, not a traceback; an input that
    cannot be read (a model file, an image) is named as such, not blamed on the output disk."""
    try:
        yield
    except OSError as e:
        if isinstance(e, (BlockingIOError, InterruptedError)):
            raise
        path = getattr(e, "filename", None)
        if path is not None and not written_by_us(path, Path(out_dir)):
            raise EngineError(f"cannot read {path}: {e.strerror or e}; nothing was written to {out_dir}") from None
        raise EngineError(f"{e.strerror or e}: {path or out_dir}; nothing was written to {out_dir}") from None


@contextmanager
def build_dir(out_dir: Path, overwrite: bool = False):
    """Yields a temporary folder to write into; on success it becomes `out_dir`, on any failure
    (Ctrl-C and SIGTERM included) it is removed and `out_dir` is untouched."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir, overwrite)
    with disk_errors(out_dir):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    existed = out_dir.exists()
    with disk_errors(out_dir), exclusive(out_dir):
        remove_stale(out_dir.parent, f".{out_dir.name}.old-")
        prefix = f".{out_dir.name}.partial-"
        try:
            tmp = temp_dir(out_dir.parent, prefix)
            yield tmp
            tmp.chmod(0o755)  # mkdtemp makes it private; an engine directory is shared like any folder
            if not existed and out_dir.exists():
                raise EngineError(f"{out_dir} was written by another process meanwhile; nothing replaced")
            if out_dir.exists():  # overwrite: swap in the new directory, then drop the old one
                old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
                out_dir.rename(old)
                tmp.rename(out_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                try:
                    os.rename(tmp, out_dir)  # never replaces a non-empty directory
                except OSError:
                    raise EngineError(f"{out_dir} was written by another process meanwhile; nothing replaced") from None
        except BaseException:  # by our own PID, not by `tmp`: a signal can land between mkdtemp and the assignment
            for own in out_dir.parent.glob(f"{glob.escape(prefix)}{os.getpid()}-*"):
                shutil.rmtree(own, ignore_errors=True)
            raise
