"""Atomic files and folders, and content digests.

Every output is written under a temporary name in its own folder, flushed to disk (``fsync``) and
renamed into place, so a reader sees the old file or the complete new one, never a partial one,
even after a crash or a killed job. Files get the mode the process umask gives any new file
(libraries such as safetensors create 0600 files, unreadable to a team on shared storage), and a
failed write (a full disk, a read-only folder) names the file it could not write.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prism_lightning.errors import LockedError, StoreCorruptError, WriteError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() gives a new file in this process
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _named(err: OSError, path: Path) -> OSError:
    """A write failure (disk full, read-only, no permission) re-raised with the path it failed on."""
    if err.errno not in WRITE_ERRORS or isinstance(err, WriteError):
        return err
    return write_error(path, err.strerror or str(err), err.errno)


def write_error(path: Path, why: str, code: int = errno.EIO) -> WriteError:
    """The one message of a failed write: the file, why, and what to check."""
    return WriteError(code, f"cannot write {path}: {why}; check that the folder is writable and the disk has space")


def _settle(path: Path) -> None:
    """fsync a written file and give it the process's normal file mode."""
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
    os.chmod(path, FILE_MODE)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _path_in_errors(path: Path) -> Iterator[None]:
    """Re-raise an ``OSError`` from the block with ``path`` and what to do in its message (``_named``)."""
    try:
        yield
    except OSError as err:
        named = _named(err, path)
        if named is err:
            raise
        raise named from err


def _with_temp_sibling(path: str | Path) -> tuple[Path, Path]:
    """``path`` and the hidden, process-specific name beside it that is written first."""
    path = Path(path)
    return path, path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it is fsynced and renamed to ``path``."""
    path, tmp = _with_temp_sibling(path)
    try:
        with _path_in_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            _settle(tmp)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see ``atomic_file``)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


@contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces ``folder`` in one rename."""
    folder, tmp = _with_temp_sibling(folder)
    try:
        with _path_in_errors(folder):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            yield tmp
            for f in tmp.rglob("*"):
                if f.is_file():
                    _settle(f)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
            _fsync_dir(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: str | Path, default=None):
    """The JSON in ``path`` (``default`` when there is no file); a damaged file is refused naming it."""
    path = Path(path)
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except OSError as err:
        raise StoreCorruptError(f"{path} cannot be read ({err.strerror or err}); check its permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreCorruptError(f"{path} is not valid JSON ({err}); it was truncated or altered: delete it and "
                                "rerun the stage that writes it") from None


def json_digest(obj) -> str:
    """sha256 of an object's canonical JSON (sorted keys; non-JSON values as strings)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


LOCK_NAME = ".prism-lock"


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.with_name(path.name + ".json").read_text())
    except (OSError, ValueError):
        return {}


TEMPORARY = re.compile(r"^\..+\.(tmp|importing|replaced)-(\d+)$")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files and folders (``.<name>.tmp-<pid>``) another process left under ``folder``: a run
    killed before it could clean up (kill -9, a lost node). Only called while holding ``folder``'s lock, so none
    of them belongs to a live run."""
    removed = []
    for path in sorted(Path(folder).rglob(".*"), key=lambda p: len(p.parts), reverse=True):
        m = TEMPORARY.match(path.name)
        if m and int(m.group(2)) != os.getpid() and path.exists():
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextmanager
def run_lock(folder: str | Path) -> Iterator[Path]:
    """Hold ``<folder>/.prism-lock`` while a run writes to ``folder``; a second run is refused at once.

    ``filelock``'s operating-system lock: the kernel releases it when the holder exits, however it ends (no stale
    lock to break). ``.prism-lock.json`` names the holder (pid, host, command) for the refusal. Taking the lock
    also proves the folder is writable. Once it is held, temporaries left by killed runs are removed
    (``remove_stale_temporaries``).
    """
    from filelock import FileLock, Timeout

    folder = Path(folder)
    path = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(sys.argv)}
    lock = FileLock(str(path), timeout=0, mode=FILE_MODE)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except Timeout:
        held = _holder(path)
        raise LockedError(f"{folder} is in use by pid {held.get('pid', '?')} on host {held.get('host', '?')} since "
                          f"{held.get('started', '?')} ({held.get('command', '')}); wait for that run or use another "
                          "output folder") from None
    except OSError as err:
        named = _named(err, path)
        if named is err:
            raise
        raise named from err
    try:
        atomic_write_text(path.with_name(path.name + ".json"), json.dumps(me))
        remove_stale_temporaries(folder)
        yield path
    finally:
        path.with_name(path.name + ".json").unlink(missing_ok=True)
        lock.release()
