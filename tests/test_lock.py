"""tstl.core.lock: exclusive/shared dataset-folder locks on flock, re-entrant, never stale after
SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tstl.core.lock import LOCK_NAME, LockedError, dataset_lock, holder

ROOT = Path(__file__).resolve().parents[1]


def _hold(folder: Path, stage: str, part: str = "None", seconds: float = 60) -> subprocess.Popen:
    code = ("import time; from pathlib import Path; from tstl.core.lock import dataset_lock\n"
            f"with dataset_lock(Path({str(folder)!r}), {stage!r}, part={part}):\n"
            f"    print('held', flush=True); time.sleep({seconds})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_exclusive_lock_names_the_holder_and_is_released_by_sigkill(tmp_path: Path) -> None:
    p = _hold(tmp_path, "prepare-ssv2")
    try:
        record = json.loads((tmp_path / LOCK_NAME).read_text())
        assert (record["pid"] == p.pid and record["stage"] == "prepare-ssv2" and record["host"]
                and record["started"])
        with (pytest.raises(LockedError,
                            match=rf"in use by pid {p.pid} on .*prepare-ssv2.*--wait-lock"),
              dataset_lock(tmp_path, "finalize")):
            pass
        assert f"pid {p.pid}" in holder(tmp_path / LOCK_NAME)
    finally:
        _kill(p)  # no cleanup runs: the kernel drops the flock
    assert holder(tmp_path / LOCK_NAME) is None
    with dataset_lock(tmp_path, "finalize"):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_wait_queues_behind_the_holder(tmp_path: Path) -> None:
    p = _hold(tmp_path, "prepare-ssv2", seconds=1.0)
    start = time.monotonic()
    with dataset_lock(tmp_path, "finalize", wait=True):
        assert time.monotonic() - start > 0.3
    p.wait()


def test_reentrant_in_one_process(tmp_path: Path) -> None:
    with dataset_lock(tmp_path, "prepare-ssv2"):
        with dataset_lock(tmp_path, "finalize"):  # a stage calling another locked stage
            pass
        assert holder(tmp_path / LOCK_NAME) is not None
    assert holder(tmp_path / LOCK_NAME) is None


def test_parts_share_the_folder_but_not_a_part(tmp_path: Path) -> None:
    p1 = _hold(tmp_path, "prepare-ssv2", part="(1, 2)")
    try:
        with dataset_lock(tmp_path, "prepare-ssv2", part=(2, 2)):  # another part: fine
            pass
        with (pytest.raises(LockedError, match=rf"pid {p1.pid}"),
              dataset_lock(tmp_path, "prepare-ssv2", part=(1, 2))):
            pass
        with (pytest.raises(LockedError, match=rf"in use by part runs: pid {p1.pid}"),
              dataset_lock(tmp_path, "finalize")):
            pass
    finally:
        _kill(p1)
    with dataset_lock(tmp_path, "finalize"):
        pass


def test_unwritable_folder_raises_oserror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def deny(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / LOCK_NAME))

    monkeypatch.setattr(os, "open", deny)
    with (pytest.raises(OSError, match="Read-only file system"),
          dataset_lock(tmp_path, "prepare-ssv2")):
        pass
