"""Runs that lose nothing: a result file is checked before any work and, when writing it still fails at the
end, the rows go to a fallback file (or stdout) with one line saying where; an image that cannot be read
becomes an error row (`image`, `error`) and the run goes on, exit code 1 at the end. The same rule for
classify, match, profile and parity as for `batch`'s error column."""

from __future__ import annotations

import errno
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from diffscore.app.render import Format, output_format, render, write_rows
from diffscore.errors import EngineError, not_a_file

PROBE_BYTES = 64 * 1024  # written and synced once where results will go: a full or read-only disk shows before work


def write_problem(folder: Path) -> OSError | None:
    """Why nothing can be written in `folder` (read-only, no permission, full disk), or None. Creates, syncs
    and removes a small file: the only test that also holds for root, read-only mounts and full disks."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".diffscore-probe-", dir=folder)
    except OSError as e:
        return e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e
    finally:
        Path(probe).unlink(missing_ok=True)
    return None


def cannot_write(folder: Path, e: OSError, what: str) -> str:
    """One line for a folder where nothing can be written, naming the cause and the way out."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{what}: the disk of {folder} is full ({e.strerror}); free some space or choose another folder"
    if e.errno == errno.EROFS:
        return f"{what}: {folder} is on a read-only file system; choose a writable folder"
    return f"{what}: cannot write in {folder} ({e.strerror or e}); choose a folder you can write to"


def check_writable_dir(folder: Path, what: str) -> None:
    """`folder` is an existing folder this process can write in, with room on its disk; one line otherwise."""
    if not folder.is_dir():
        raise EngineError(f"{what}: folder {folder} does not exist" if not folder.exists() else
                          f"{what}: {folder} is not a folder")
    if (problem := write_problem(folder)) is not None:
        raise EngineError(cannot_write(folder, problem, what))


@contextmanager
def engine_writer(engine_dir: Path, command: str):
    """Held by a command that rewrites an engine's manifest after long work (`profile`): the writer lock that
    export and calibrate take, and a writable engine folder, both checked before the work."""
    from diffscore.export.atomic import exclusive

    with exclusive(Path(engine_dir), "writing"):
        check_writable_dir(Path(engine_dir), f"{command} records into {engine_dir}")
        yield


def check_output(path: Path | None) -> Format | None:
    """-o FILE checked before any scoring: a known extension, a name that is a file or nothing yet (not a
    folder, FIFO or device), in an existing folder that can be written to and has room."""
    if path is None:
        return None
    fmt = output_format(path)  # the extension, the folder's existence
    check_target(path)
    return fmt


def check_target(path: Path) -> None:
    """A result file can be written at `path`: it is a file or nothing yet, in a folder with room that we can
    write in (any result format: also batch's .parquet)."""
    if path.parent.exists() and not path.parent.is_dir():
        raise EngineError(f"--output {path}: {path.parent} is a file, not a folder; choose a path in a folder")
    if path.is_dir():
        raise EngineError(f"--output {path} is a folder; give a file name in it, e.g. "
                          f"{path / ('results' + path.suffix)}")
    if path.exists() and not path.is_file():
        raise EngineError(f"--output: {not_a_file(path, 'path')}; give a regular file name")
    check_writable_dir(path.parent, f"--output {path}")


def fallback_folders(path: Path) -> list[Path]:
    """Where results go when `path` cannot be written at the end: beside it, else the temporary folder."""
    return [path.parent, Path(tempfile.gettempdir())]


def save_rows(rows: list[dict], path: Path) -> None:
    """Write rows to `path` (atomically); when that fails now, after the work (the disk filled up, the
    folder went away), the rows go to a fallback file beside it or in the temporary folder, else to stdout,
    and one line says where: finished work is never lost."""
    try:
        write_rows(rows, path)
        return
    except OSError as e:
        reason = e.strerror or str(e)
    fmt = output_format(path)
    text = render(rows, fmt)
    for folder in fallback_folders(path):
        try:
            fd, fallback = tempfile.mkstemp(prefix=f"{path.stem}.unsaved-", suffix=path.suffix, dir=folder)
        except OSError:
            continue
        try:
            with os.fdopen(fd, "w", newline="") as f:
                f.write(text)
        except OSError:
            Path(fallback).unlink(missing_ok=True)
            continue
        raise EngineError(f"could not write {path} ({reason}); the {len(rows)} rows were written to {fallback} instead")
    sys.stdout.write(text)
    sys.stdout.flush()
    raise EngineError(
        f"could not write {path} ({reason}) nor a fallback file; the {len(rows)} rows are on stdout above")


class ReadableImages:
    """Image files opened one at a time as a scorer asks for them (any scorer that takes an iterable, in
    bounded memory): a file that cannot be read is skipped and its error kept, so the run goes on."""

    def __init__(self, paths):
        self.paths = [Path(p) for p in paths]
        self.read: list[int] = []  # positions of the images handed to the scorer, in order
        self.errors: dict[int, str] = {}  # position -> why it could not be read
        self._first = None  # (position, image) of the first readable image, read by start()

    def __len__(self) -> int:  # the progress bar's total
        return len(self.paths)

    def start(self) -> "ReadableImages":
        """Read up to the first readable image before any work: when none can be read, one line (exit 1), no
        engine loaded, no progress bar."""
        from diffscore.engine.images import to_pil

        for i, path in enumerate(self.paths):
            try:
                self._first = (i, to_pil(path))
                return self
            except EngineError as e:
                self.errors[i] = str(e)
        self.check()
        return self

    def __iter__(self):
        from diffscore.engine.images import to_pil

        first, self._first = self._first, None
        skip = first[0] if first else 0  # the images before it failed in start(); their errors stay
        self.read, self.errors = [], {i: e for i, e in self.errors.items() if i < skip}
        for i in range(skip, len(self.paths)):
            try:
                image = first[1] if first and i == first[0] else to_pil(self.paths[i])
            except EngineError as e:
                self.errors[i] = str(e)
                continue
            self.read.append(i)
            yield image

    @property
    def read_paths(self) -> list[Path]:
        return [self.paths[i] for i in self.read]

    def readable_paths(self) -> list[str]:
        """Read every image once (not kept) and return the paths that can be read: for a scorer that goes
        over the images several times (parity), without holding them all in memory."""
        for _ in self:
            pass
        return [str(p) for p in self.read_paths]

    def rows(self, read_rows: list[dict], fill=None) -> list[dict]:
        """Every image's row in input order: `read_rows` (one per image read, in order) and {image, error}
        for each image that could not be read. Every row gets the same keys (`fill` where it has none)."""
        by_position = dict(zip(self.read, read_rows))
        keys = list(dict.fromkeys(["image", *(k for row in read_rows for k in row)]
                                  + (["error"] if self.errors else [])))
        rows = []
        for i, path in enumerate(self.paths):
            row = by_position.get(i) or {"image": str(path), "error": self.errors.get(i)}
            rows.append({k: fill if row.get(k) is None else row[k] for k in keys})
        return rows

    def check(self, kept: str = "the results of the other {n} are kept, each failure as a row with its error") -> None:
        """One line (exit 1) when some images could not be read; `kept` says what became of the others ({n}: how
        many were read)."""
        if not self.errors:
            return
        first = self.errors[min(self.errors)]
        if len(self.paths) == 1:
            raise EngineError(first)
        if not self.read and len(self.errors) == len(self.paths):
            raise EngineError(f"none of the {len(self.paths)} images could be read (first: {first})")
        raise EngineError(f"{len(self.errors)} of {len(self.paths)} images could not be read (first: {first}); "
                          + kept.format(n=len(self.read)))
