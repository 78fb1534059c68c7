"""End to end on a real one-host Slurm cluster: the prepare array, 2-task training through the
project's sbatch script, and preemption (warning signal -> checkpoint at the next step -> requeue ->
resume on the same trajectory).

Everything goes through ``configs/launch/*.sbatch`` exactly as docs/training.md tells a user to
submit it; only the resources are overridden on the command line (one node with 2 CPUs instead of
GPU nodes).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from tests.cluster.slurm import Cluster
from tests.conftest import ROOT, TINY, free_port, subprocess_env

CONFIGS = [str(ROOT / "configs/data/ssv2.yaml"), str(ROOT / "configs/demo.yaml")]
TRAIN_SBATCH = str(ROOT / "configs/launch/slurm_train.sbatch")
PREPARE_SBATCH = str(ROOT / "configs/launch/slurm_prepare.sbatch")
# the script's GPU-node resources, overridden for this 2-CPU node (a user changes these the same
# way)
ONE_NODE = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
            "--time=30"]
TRAIN_ARGS = [*CONFIGS, "epochs=3", *TINY]


def _job_env(cluster: Cluster) -> dict:
    """What the test exports to the job: this checkout, the venv's python, a free rendezvous
    port."""
    env = cluster.env(**subprocess_env())
    env.update(TSTL_REPO=str(ROOT), TSTL_PYTHON=sys.executable, PYTHONPATH=str(ROOT),
               MASTER_PORT=free_port())
    # DeepSpeed's JIT-built op: the user's usual cache, not the script's default inside the checkout
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/torch_extensions"))
    return env


def _losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = row["train/loss"]
    return out


def _outputs(dataset_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(dataset_dir)): p.read_bytes() for p in sorted(dataset_dir.rglob("*"))
            if p.is_file() and p.suffix in (".mp4", ".csv", ".txt")}


def test_prepare_as_an_array_plus_finalize(slurm: Cluster, data_dir: Path, tmp_path: Path) -> None:
    """``data_dir`` was prepared by one local run; the array's 2 parts + finalize must write the
    same files."""
    out = tmp_path / "data"
    env = _job_env(slurm)
    array = slurm.sbatch("--array=1-2", "--cpus-per-task=1", f"--output={tmp_path}/prepare-%a.out",
                         PREPARE_SBATCH, str(data_dir / "raw/ssv2"), str(out), env=env)
    final = slurm.sbatch(f"--dependency=afterok:{array}", f"--output={tmp_path}/finalize.out",
                         f"--chdir={ROOT}", "--wrap",
                         f"{sys.executable} -m pipeline.cli finalize {out}/ssv2", env=env)
    assert slurm.wait(final, 300) == "COMPLETED", (tmp_path / "finalize.out").read_text()
    assert slurm.wait(array, 10) == "COMPLETED"
    assert sorted(p.name for p in (out / "ssv2").glob("manifest.part-*")) == [
        "manifest.part-1-of-2.parquet", "manifest.part-2-of-2.parquet"]
    assert _outputs(out / "ssv2") == _outputs(data_dir / "ssv2")


@pytest.fixture(scope="module")
def reference_run(slurm: Cluster, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-task training job through configs/launch/slurm_train.sbatch."""
    run = tmp_path_factory.mktemp("slurm-train") / "run"
    log = run.parent / "job.out"
    job = slurm.sbatch(*ONE_NODE, f"--output={log}", TRAIN_SBATCH, *TRAIN_ARGS,
                       f"data_dir={data_dir}", f"out_dir={run}", env=_job_env(slurm))
    assert slurm.wait(job, 400) == "COMPLETED", log.read_text()[-4000:]
    return run


def test_two_tasks_train_through_the_sbatch_script(reference_run: Path) -> None:
    marker = json.loads(
        sorted((reference_run / "checkpoints").glob("*/complete.json"))[-1].read_text())
    assert marker["world_size"] == 2
    # 12 clips / (2 tasks x batch 2) = 3 steps per epoch
    assert len(_losses(reference_run)) == 3 * 3
    assert json.loads((reference_run / "test/metrics.json").read_text())["videos"] == 4
    assert (reference_run / "report.md").exists()


@pytest.mark.parametrize("how", ["warning", "term-all"])
def test_preempted_job_checkpoints_requeues_and_resumes(
        how: str, slurm: Cluster, data_dir: Path, reference_run: Path, tmp_path: Path) -> None:
    """``warning``: the USR1 Slurm sends the batch script before the time limit, forwarded by it.
    ``term-all``: SIGTERM to the training step (``scancel --signal=TERM JOB.0``): slurmstepd
    signals every process of the step, the loader workers included, which must not die before
    their rank saves (a time limit does the same, and also signals ``srun``, which then kills the
    step: hence the script's ``--signal=B:USR1@300`` warning)."""
    run, log = tmp_path / "run", tmp_path / "job.out"
    # the loader's order does not depend on the worker count: the losses equal the reference's
    workers = ["data.num_workers=1"] if how == "term-all" else []
    job = slurm.sbatch(*ONE_NODE, f"--output={log}", TRAIN_SBATCH, *TRAIN_ARGS, *workers,
                       f"data_dir={data_dir}", f"out_dir={run}", env=_job_env(slurm))
    deadline = time.monotonic() + 300
    while not ((run / "metrics.jsonl").exists() and _losses(run)):  # the first step is done
        assert slurm.state(job) in ("PENDING", "RUNNING", "CONFIGURING"), log.read_text()[-4000:]
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.05)
    if how == "warning":
        # the warning Slurm sends before the time limit (--signal=B:USR1@300), sent now: to the
        # batch script only
        slurm.run("scancel", "--signal=USR1", "--batch", str(job))
    else:
        slurm.run("scancel", "--signal=TERM", f"{job}.0")
    name = "USR1" if how == "warning" else "TERM"
    # the job is requeued (its script says so), runs again and completes
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        info = slurm.job_info(job)
        if (info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED")
                and int(info.get("Restarts", 0)) >= 1):
            break
        assert info["JobState"] not in ("FAILED", "CANCELLED"), log.read_text()[-4000:]
        time.sleep(0.5)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert "requeueing job" in text and "restart 1" in text, text[-4000:]
    saved = re.search(rf"{name} received: checkpoint saved at step (\d+)", text)
    assert saved, text[-4000:]
    step = int(saved.group(1))
    # resumed from the signal's checkpoint
    assert 1 <= step < 9 and f"step-{step:07d} (step {step}," in text
    want, got = _losses(reference_run), _losses(run)
    assert sorted(got) == sorted(want)
    for s in want:
        assert got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-7), s
