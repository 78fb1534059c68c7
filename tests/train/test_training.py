"""End-to-end training on synthetic shards: 2 ranks on gloo (ZeRO-1, fp32 and bf16),
kill-and-resume, eval CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, Leaks
from tests.conftest import subprocess_env as _env

CONFIGS = [str(ROOT / "configs/data/ssv2.yaml"), str(ROOT / "configs/demo.yaml")]


def _losses(run: Path) -> dict[int, float]:
    """Last logged training loss of every step (a resumed run logs the replayed steps again)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = row["train/loss"]
    return out


@pytest.mark.multiproc
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_two_ranks_zero1(data_dir: Path, tmp_path: Path, precision: str, leaks: Leaks) -> None:
    """...and nothing left behind (issue 21): no process, no /dev/shm file (DeepSpeed's
    shared-memory all-reduce buffers, 65 MB per rank, used to stay), no temp file (``leaks``)."""
    run = tmp_path / "run"
    # the launcher `make train` uses: it passes --local_rank=N to every process
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           leaks.port(), "--module", "tstl.train.cli", "train", "--config", *CONFIGS,
           f"data_dir={data_dir}", f"out_dir={run}", "epochs=2", "engine.zero_stage=1",
           f"engine.precision={precision}", *TINY]
    proc = subprocess.run(cmd, cwd=ROOT, env=leaks.env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "test/metrics.json").read_text())
    assert metrics["videos"] == 4  # every val video once, merged across both ranks (1 per class)
    assert (run / "test/confusion.png").exists() and (run / "report.md").exists()
    assert ((run / "curves.png").exists()
            and "## Most confused pairs" in (run / "report.md").read_text())
    # issue 14: counted model FLOPs; no MFU on CPU
    perf = json.loads((run / "perf.json").read_text())
    assert (perf["train_flops_per_clip"] > perf["forward_flops_per_clip"] > 0
            and perf["peak_flops"] is None)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["perf/achieved_flops"] > 0 and "perf/mfu" not in r for r in rows
               if "train/loss" in r)
    # 12 training clips / (2 ranks x batch 2) = 3 steps per epoch, on each rank
    assert len(_losses(run)) == 2 * 3
    marker = json.loads(next((run / "checkpoints").glob("*/complete.json")).read_text())
    assert marker["world_size"] == 2
    assert "bf16" in (run / "config.yaml").read_text() if precision == "bf16" else True


def test_killed_training_resumes_on_the_same_trajectory(data_dir: Path, tmp_path: Path,
                                                        leaks: Leaks) -> None:
    base = [sys.executable, "-m", "tstl.train.cli", "train", "--config", *CONFIGS,
            f"data_dir={data_dir}", "epochs=3", "checkpoint.every_steps=2",
            "data.rrc_scale=[0.5,1.0]", *TINY]
    ref, run = tmp_path / "ref", tmp_path / "run"
    proc = subprocess.run(base + [f"out_dir={ref}"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = subprocess.Popen(base + [f"out_dir={run}"], cwd=ROOT, env=leaks.env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + 300
    while (time.monotonic() < deadline
           and not list((run / "checkpoints").glob("step-0000004/complete.json"))):
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    leaks.check()  # a SIGKILL leaves no process, /dev/shm or temp file behind either
    assert not (run / "test").exists(), "the run finished before it could be killed"
    proc = subprocess.run(base + [f"out_dir={run}"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr
    want, got = _losses(ref), _losses(run)
    assert sorted(got) == sorted(want) and len(want) == 3 * 6
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step


def test_eval_cli_on_a_run_and_config_errors(data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train = [sys.executable, "-m", "tstl.train.cli", "train", "--config", *CONFIGS,
             f"data_dir={data_dir}", f"out_dir={run}", "epochs=1", "test_at_end=false", *TINY]
    assert (subprocess.run(train, cwd=ROOT, env=_env(), capture_output=True, timeout=600).returncode
            == 0)
    ev = subprocess.run([sys.executable, "-m", "tstl.train.cli", "eval", "--checkpoint", str(run)],
                        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads(ev.stdout[ev.stdout.index("{"):])
    assert result["videos"] == 4 and Path(result["report"], "confusion.csv").exists()
    bad = subprocess.run(train[:-len(TINY)] + ["optim.lrr=1"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown key 'optim.lrr'" in bad.stderr
