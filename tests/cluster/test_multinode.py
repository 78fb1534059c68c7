"""DeepSpeed multi-node for real: two launcher processes on this machine act as two nodes of one
hostfile (``--no_ssh --node_rank 0/1``, one rank each) and train exactly as one 2-rank launch
does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, Leaks

CONFIGS = [str(ROOT / "configs/data/ssv2.yaml"), str(ROOT / "configs/demo.yaml")]
DS = [sys.executable, "-m", "deepspeed.launcher.runner"]


def _train_args(data_dir: Path, run: Path) -> list[str]:
    return ["--module", "tstl.train.cli", "train", "--config", *CONFIGS, f"data_dir={data_dir}",
            f"out_dir={run}", "epochs=2", "engine.zero_stage=1", *TINY, "val_every=0",
            "test_at_end=false"]


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.multiproc
def test_two_nodes_without_ssh_match_one_two_rank_launch(data_dir: Path, tmp_path: Path,
                                                         leaks: Leaks) -> None:
    """...and leave nothing behind (``leaks``: no process, /dev/shm or temp file; issue 21)."""
    one, two = tmp_path / "one-launch", tmp_path / "two-nodes"
    proc = subprocess.run([*DS, "--num_gpus", "2", "--master_port", leaks.port(),
                           *_train_args(data_dir, one)],
                          cwd=ROOT, env=leaks.env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # two "nodes": names in the hostfile need not resolve with --no_ssh; every node runs its own
    # launcher
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = leaks.port()
    launchers = [subprocess.Popen([*DS, "--hostfile", str(hostfile), "--no_ssh", "--node_rank",
                                   str(r), "--master_addr", "127.0.0.1", "--master_port", port,
                                   *_train_args(data_dir, two)],
                                  cwd=ROOT, env=leaks.env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    marker = json.loads(sorted((two / "checkpoints").glob("*/complete.json"))[-1].read_text())
    assert marker["world_size"] == 2
    want, got = _losses(one), _losses(two)
    assert len(want) == 2 * 3 and sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
