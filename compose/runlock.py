"""The run lock: one training run at a time in an output directory.

The lock is an OS file lock (``filelock``) on :data:`LOCK_NAME`, which also holds the pid, host
and start time of the run that holds it, so that a refused run can say who is in its way. The OS
releases the lock when its process dies, so the file a killed run leaves behind is taken over.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

__all__ = ["LOCK_NAME", "LockError", "output_lock"]

LOCK_NAME = ".compose.lock"
"""Held in a run's output directory while ``fit`` runs: ``{"pid", "host", "started"}``."""


class LockError(RuntimeError):
    """Another live run holds the output directory."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _parse(raw: bytes | str) -> dict[str, Any]:
    try:
        held = json.loads(raw or "{}")
    except ValueError:
        return {}
    return held if isinstance(held, dict) else {}


def _read_lock(lock: Path) -> dict[str, Any]:
    try:
        return _parse(lock.read_bytes())
    except OSError:
        return {}


def _in_use(directory: Path, lock: Path, held: dict[str, Any]) -> LockError:
    pid, host = held.get("pid"), held.get("host")
    who = f"process {pid} on {host}" if pid else "another process"
    return LockError(
        f"{directory} is in use by {who} (since {held.get('started', '?')}): two runs must not share an "
        f"output directory. Wait for it, use another output_dir, or delete {lock} if that run is gone"
    )


class _Holder:
    """Called by ``filelock`` with the lock file's descriptor once the OS lock is ours: records who holds it.

    A file left by a run on another host is refused (raising rolls the acquisition back): an OS lock
    is not shared across hosts on every file system, so compose cannot see whether that run lives.
    """

    def __init__(self, directory: Path, lock: Path):
        self.directory, self.lock = directory, lock
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
        self.previous: dict[str, Any] = {}

    def __call__(self, fd: int) -> None:
        self.previous = _parse(os.pread(fd, 1 << 16, 0))
        host = self.previous.get("host")
        if host and host != self.me["host"]:
            raise _in_use(self.directory, self.lock, self.previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.me).encode(), 0)


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold ``directory/.compose.lock`` (an OS lock; pid + host inside) for the duration of a run.

    A lock held by a live process is a :class:`LockError` naming it. A lock file whose process
    is gone (the OS released its lock) is taken over with a warning. A lock file from another
    host is an error naming it (compose cannot see whether that process lives).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK_NAME
    holder = _Holder(directory, lock)
    file_lock = FileLock(lock, timeout=0, on_acquired=holder)
    try:
        file_lock.acquire()
    except Timeout:
        raise _in_use(directory, lock, _read_lock(lock)) from None
    pid = holder.previous.get("pid")
    if pid:
        warnings.warn(f"compose: taking over the stale lock {lock} of process {pid}, which is gone", stacklevel=3)
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)  # while still held: a process that opened this file sees it was removed
        file_lock.release()
