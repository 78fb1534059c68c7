"""No silent waits (issue 21): a step of start-up that takes long says what it may be waiting for.

DeepSpeed joins the process group (all ranks must arrive at ``MASTER_ADDR:MASTER_PORT``) and
JIT-builds C++ ops under torch's file lock (``<TORCH_EXTENSIONS_DIR>/<op>/lock``, created with
``O_EXCL`` and held open by the building process, ``torch.utils.file_baton``); a build killed
mid-way leaves the lock behind and every later build of that op waits for it forever. Neither
says a word. ``note_waits`` logs, every ``every_s`` seconds while its block runs, the lock files
that exist and whether a process on this machine holds them, with the fix.

The lock is not removed for the user: a holder on another machine sharing the folder (a home
folder on NFS) cannot be seen from here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


def extensions_root() -> Path:
    """Where torch JIT-builds C++ extensions (``TORCH_EXTENSIONS_DIR`` or its default)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def jit_locks(root: Path | None = None) -> dict[Path, list[int]]:
    """{lock file: pids on this machine that hold it open} for every build lock under ``root``."""
    root = root or extensions_root()
    locks = sorted({*root.glob("*/lock"), *root.glob("*/*/lock")}) if root.is_dir() else []
    holders: dict[Path, list[int]] = {lock: [] for lock in locks}
    if not locks:
        return holders
    wanted = {str(lock.resolve()): lock for lock in locks}
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            target = os.readlink(fd)
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if target in wanted:
            holders[wanted[target]].append(int(fd.parts[2]))
    return holders


def describe(what: str, seconds: float, otherwise: str = "") -> str:
    """The message for a wait of ``seconds`` in ``what``: the build locks and how to clear them, or
    ``otherwise`` (what else it may wait for) when there is none."""
    locks = jit_locks()
    if not locks:
        return f"{what} has taken {seconds:.0f} s so far; no torch JIT-build lock exists{otherwise}"
    parts = []
    for lock, pids in locks.items():
        held = f"held by pid {', '.join(map(str, pids))}" if pids else "no process here holds it"
        parts.append(f"{lock} ({held})")
    return (f"{what} has taken {seconds:.0f} s so far; torch JIT-build locks exist: "
            f"{'; '.join(parts)}. A lock no process holds was left by a killed build: delete it "
            "(if no machine sharing that folder is building the op) and the wait ends")


def rendezvous() -> str:
    """What joining the process group waits for (for ``note_waits``)."""
    return (f"; every rank must reach {os.environ.get('MASTER_ADDR', '?')}:"
            f"{os.environ.get('MASTER_PORT', '?')} ({os.environ.get('WORLD_SIZE', '1')} ranks): "
            "check that all of them started")


@contextlib.contextmanager
def note_waits(what: str, every_s: float = 60.0, otherwise: str = "") -> Iterator[None]:
    """Log ``describe(what, ...)`` every ``every_s`` seconds while the block runs."""
    done = threading.Event()
    start = time.monotonic()

    def watch() -> None:
        while not done.wait(every_s):
            logger.warning("%s", describe(what, time.monotonic() - start, otherwise))

    thread = threading.Thread(target=watch, name="note-waits", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
