"""Issue 21 on the training side: no silent wait on a JIT lock, no shared-memory or process leak, signals in every
phase, damaged checkpoints, one ``error:`` line per failure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, Leaks

INIT = "from tstl.train import dist; dist.init(); print('initialised', flush=True)"


def test_a_killed_op_build_leaves_nothing_a_later_run_waits_on(leaks: Leaks) -> None:
    """What a CPU run killed while DeepSpeed JIT-built ``deepspeed_shm_comm`` left: torch's build lock (an empty file
    created with O_EXCL; torch.utils.file_baton) and a build folder. Before the fix every later run slept on that
    lock without a word; now no run builds the op at all (tstl.train.dist._skip_shm_op)."""
    env = leaks.env()
    op = Path(env["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm"
    op.mkdir(parents=True)
    (op / "lock").touch()
    (op / "build.ninja").write_text("# cut off\n")
    before = sorted(p.name for p in op.iterdir())
    # a hang fails through the timeout (the run used to wait until the lock was deleted)
    proc = subprocess.run([sys.executable, "-c", INIT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0 and "initialised" in proc.stdout, proc.stderr[-3000:]
    assert sorted(p.name for p in op.iterdir()) == before  # nothing built, nothing compiled
