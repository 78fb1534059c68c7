"""Preemption without a scheduler (runs everywhere, no root): SIGTERM -> checkpoint at the next step
-> exit 75 -> the rerun resumes from that step; a rerun with a changed hyperparameter is refused
with the diff."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, Leaks

CONFIGS = [str(ROOT / "configs/data/ssv2.yaml"), str(ROOT / "configs/demo.yaml")]


def _wait_for_first_step(proc: subprocess.Popen, run: Path, timeout: float = 300) -> None:
    """Until the run has logged a training loss (the trainer is inside its loop)."""
    deadline = time.monotonic() + timeout
    while not ((run / "metrics.jsonl").exists()
               and "train/loss" in (run / "metrics.jsonl").read_text()):
        assert (proc.poll() is None
                and time.monotonic() < deadline), "training ended or never started"
        time.sleep(0.05)


def test_sigterm_saves_exits_75_and_the_rerun_resumes(data_dir: Path, tmp_path: Path,
                                                       leaks: Leaks) -> None:
    from tstl.train.preemption import EXIT_PREEMPTED

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "tstl.train.cli", "train", "--config", *CONFIGS,
           f"data_dir={data_dir}", f"out_dir={run}", "epochs=3", *TINY, "val_every=0",
           "test_at_end=false"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=leaks.env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_first_step(proc, run)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == EXIT_PREEMPTED == 75, err[-3000:]
    step = int(re.search(r"SIGTERM received: checkpoint saved at step (\d+)", err).group(1))
    assert json.loads(
        (run / f"checkpoints/step-{step:07d}/complete.json").read_text())["step"] == step

    again = subprocess.run(cmd, cwd=ROOT, env=leaks.env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"step-{step:07d} (step {step}," in again.stderr  # resumed from the signal's checkpoint
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    # 12 clips / batch 2 = 6 steps per epoch, none missing
    assert set(steps) == set(range(1, 3 * 6 + 1))

    changed = subprocess.run(cmd + ["optim.lr=5e-4", "log_every=2"], cwd=ROOT, env=leaks.env(),
                             capture_output=True, text=True, timeout=300)
    assert changed.returncode == 2, changed.stderr[-3000:]
    # the CLI prints "error: <message>" (exit 2)
    error = changed.stderr[changed.stderr.index("error: "):]
    assert "optim.lr: 0.064 -> 0.0005" in error and "checkpoint.accept_config_change=true" in error
    assert "log_every: 1 -> 2" not in error.split("Use another")[0]  # a safe change is not listed


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_to_the_whole_process_group_spares_the_loader_workers(
        signum: signal.Signals, data_dir: Path, tmp_path: Path, leaks: Leaks) -> None:
    """Slurm signals every process of a step (time limit, ``scancel``, a forwarded warning), and so
    does ``kill -TERM -PGID``: the DataLoader workers get the signal too. They must live on until
    the trainer has saved; a worker that died of it crashed the run (exit 1, no checkpoint)."""
    from tstl.train.preemption import EXIT_PREEMPTED

    run = tmp_path / "run"
    tiny = [a for a in TINY if not a.startswith("data.num_workers")]
    cmd = [sys.executable, "-m", "tstl.train.cli", "train", "--config", *CONFIGS,
           f"data_dir={data_dir}", f"out_dir={run}", "epochs=2", *tiny, "data.num_workers=2",
           "val_every=0", "test_at_end=false"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=leaks.env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_first_step(proc, run)
    os.killpg(proc.pid, signum)  # the trainer and both workers
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    name = signal.Signals(signum).name
    step = int(re.search(rf"{name} received: checkpoint saved at step (\d+)", err).group(1))
    assert (run / f"checkpoints/step-{step:07d}/complete.json").exists()
    assert "exited unexpectedly" not in err
