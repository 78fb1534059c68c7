"""Exclusive (or shared) per-dataset-folder locks for writing stages, on ``fcntl.flock``.

``with dataset_lock(folder, "prepare-ssv2"): ...`` holds ``<folder>/.tstl.lock`` for the block. The
kernel drops a flock when its holder dies (SIGKILL, OOM, power loss of the process), so a crashed
run never leaves a stale lock; the file itself stays and only records who holds it (pid, host,
command, start time) for the message a second run gets.

A second run raises :class:`LockedError` at once naming the holder, or waits with ``wait=True``.
``shared=True`` takes a shared lock (several ``--part i/n`` runs may work in one folder together; an
exclusive holder such as ``finalize`` excludes them all). The lock is re-entrant within one process
(a stage may call another locked stage). flock works on local filesystems and on NFSv4 (Linux
emulates it with byte-range locks there).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".tstl.lock"

_held: dict[str, list] = {}  # realpath -> [fd, depth, shared]
_guard = threading.Lock()


class LockedError(RuntimeError):
    """Another process holds the dataset folder; the message names it."""


def _describe(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process (it has not recorded itself yet)"
    return (f"pid {info.get('pid')} on {info.get('host')} ({info.get('stage')}, "
            f"started {info.get('started')}: {info.get('command')})")


def holder(path: Path) -> str | None:
    """Who holds the lock file ``path`` now, or None when nobody does (probed without waiting)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return _describe(path)
    finally:
        os.close(fd)


@contextmanager
def file_lock(path: Path, stage: str, *, wait: bool = False,
              shared: bool = False) -> Iterator[None]:
    """Hold ``path`` (created if needed) locked for the block; see the module docstring."""
    key = os.path.realpath(path)
    with _guard:
        if key in _held:
            _held[key][1] += 1
            entry = _held[key]
        else:
            entry = None
    if entry is not None:
        try:
            yield
        finally:
            with _guard:
                entry[1] -= 1
        return
    # OSError (EROFS, EACCES) propagates: an environment error
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise LockedError(f"{path.parent} is in use by {_describe(path)}; wait for it to "
                                  "finish, or rerun with --wait-lock to queue behind it") from None
            fcntl.flock(fd, mode)
        if not shared:  # a shared holder must not overwrite another holder's record
            record = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
                      "command": " ".join(sys.argv),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        with _guard:
            _held[key] = [fd, 1, shared]
        try:
            yield
        finally:
            with _guard:
                del _held[key]
    finally:
        os.close(fd)  # closing the only descriptor releases the flock


@contextmanager
def dataset_lock(folder: Path, stage: str, *, wait: bool = False,
                 part: tuple[int, int] | None = None) -> Iterator[None]:
    """Lock the dataset folder ``folder`` (created if missing) for a writing stage named ``stage``.

    With ``part=(i, n)``, n > 1, the folder is held shared (other parts may run in it) and the part
    exclusively (``<folder>/.tstl.lock.part-i-of-n``), so two runs of one part, or a part and an
    exclusive stage, never overlap.

    Raises:
        LockedError: another process holds it and ``wait`` is false; the message names the
            holder(s).
        OSError: the folder cannot be written (read-only filesystem, permissions).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    main = folder / LOCK_NAME
    shared = part is not None and part[1] > 1
    acquired = False
    try:
        with file_lock(main, stage, wait=wait, shared=shared):
            if not shared:
                acquired = True
                yield
                return
            with file_lock(folder / f"{LOCK_NAME}.part-{part[0]}-of-{part[1]}", stage, wait=wait):
                acquired = True
                yield
    except LockedError as e:
        if acquired:
            raise
        parts = [h for p in sorted(folder.glob(f"{LOCK_NAME}.part-*")) if (h := holder(p))]
        if parts and str(e).startswith(f"{folder} is in use by"):
            raise LockedError(f"{folder} is in use by part runs: {'; '.join(parts)}; wait for them "
                              "to finish, or rerun with --wait-lock to queue behind them") from None
        raise
