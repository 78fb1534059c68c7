"""Issue 21 on the training side: no silent wait on a JIT lock, no shared-memory or process leak,
signals in every phase, damaged checkpoints, one ``error:`` line per failure."""

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

INIT = "from tstl.train import dist; dist.init(); print('initialised', flush=True)"


def test_a_killed_op_build_leaves_nothing_a_later_run_waits_on(leaks: Leaks) -> None:
    """What a CPU run killed while DeepSpeed JIT-built ``deepspeed_shm_comm`` left: torch's build
    lock (an empty file created with O_EXCL; torch.utils.file_baton) and a build folder. Before the
    fix every later run slept on that lock without a word; now no run builds the op at all
    (tstl.train.dist._skip_shm_op)."""
    env = leaks.env()
    op = Path(env["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm"
    op.mkdir(parents=True)
    (op / "lock").touch()
    (op / "build.ninja").write_text("# cut off\n")
    before = sorted(p.name for p in op.iterdir())
    # a hang fails through the timeout (the run used to wait until the lock was deleted)
    proc = subprocess.run([sys.executable, "-c", INIT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0 and "initialised" in proc.stdout, proc.stderr[-3000:]
    assert sorted(p.name for p in op.iterdir()) == before  # nothing built, nothing compiled


def test_a_long_wait_names_the_build_locks_and_the_fix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """No run waits on a lock without saying so: a slow start-up step lists torch's build locks,
    whether a process here holds them, and the fix."""
    from tstl.train.waits import note_waits

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "cpu_adam" / "lock"
    lock.parent.mkdir()
    lock.touch()
    with note_waits("DeepSpeed's initialisation", every_s=0.05):
        time.sleep(0.3)
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said and f"{lock} (no process here holds it)" in said[0] and "delete it" in said[0]
    caplog.clear()
    with open(lock), note_waits("DeepSpeed's initialisation", every_s=0.05):  # a live build
        time.sleep(0.3)
    assert f"{lock} (held by pid {os.getpid()})" in caplog.records[0].getMessage()
    caplog.clear()
    lock.unlink()
    with note_waits("joining the process group", every_s=0.05, otherwise="; ranks missing"):
        time.sleep(0.3)
    assert caplog.records[0].getMessage().endswith("no torch JIT-build lock exists; ranks missing")


# --------------------------------------------------------------------------- signals in every phase

CONFIGS = [str(ROOT / "configs/data/ssv2.yaml"), str(ROOT / "configs/demo.yaml")]
PHASES = {  # phase -> (module, attribute) that gets a SIGTERM to its own process as it starts
    "start-up": ("tstl.train.trainer", "Trainer._log_start"),
    "validation": ("tstl.train.trainer", "Trainer.validate"),
    "save": ("tstl.train.checkpoint", "Checkpointer.save"),
    "test": ("tstl.train.trainer", "Trainer.test"),
    "report": ("tstl.train.report", "write_report"),
}


def _train_args(data_dir: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--config", *CONFIGS, f"data_dir={data_dir}", f"out_dir={run}", "epochs=2",
            *TINY, *extra]


def _signal_phases(data_dir: str, root: str) -> None:
    """Run in a child process: one training per phase of ``PHASES``, each signalled as that phase
    starts; prints what each left as JSON. In-process, so the child pays for its imports once."""
    import importlib
    import os
    import signal

    from tstl.train import cli

    out = {}
    for phase, (module, attr) in PHASES.items():
        owner = importlib.import_module(module)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        real = getattr(owner, name)

        def hit(*args, real=real, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            return real(*args, **kwargs)

        setattr(owner, name, hit)
        run = Path(root) / phase
        try:
            code = cli.main(_train_args(Path(data_dir), run))
        finally:
            setattr(owner, name, real)
        out[phase] = {"code": code, **_state(run)}
    # the test, interrupted, is done again
    rerun = cli.main(_train_args(Path(data_dir), Path(root) / "test"))
    out["test-rerun"] = {"code": rerun, **_state(Path(root) / "test")}
    print("PHASES " + json.dumps(out))


def _state(run: Path) -> dict:
    """What a run folder holds: complete checkpoints with their metric, trained steps, test and
    report."""
    markers = sorted(run.glob("checkpoints/step-*/complete.json"))
    metrics = run / "metrics.jsonl"
    rows = [json.loads(r) for r in metrics.read_text().splitlines()] if metrics.exists() else []
    return {"checkpoints": {m.parent.name: json.loads(m.read_text())["metric"] for m in markers},
            "trained": len([r for r in rows if "train/loss" in r]),
            "test": (run / "test/metrics.json").exists(), "report": (run / "report.md").exists()}


def test_a_signal_in_any_phase_ends_the_run_resumable(data_dir: Path, tmp_path: Path,
                                                      leaks: Leaks) -> None:
    """Issue 21: the handlers cover start-up, saves, evaluation and the report (they used to be
    installed around the training loop only, and a signal elsewhere killed the process). 12 clips /
    batch 2 = 6 steps per epoch."""
    code = ("import sys; from tests.train.test_hardening import _signal_phases; "
            "_signal_phases(sys.argv[1], sys.argv[2])")
    proc = subprocess.run([sys.executable, "-c", code, str(data_dir), str(tmp_path)], cwd=ROOT,
                          env=leaks.env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout[proc.stdout.index("PHASES ") + 7:].splitlines()[0])
    nothing = {"checkpoints": {}, "trained": 0, "test": False, "report": False}
    assert got["start-up"] == {"code": 75, **nothing}  # before the first step: nothing to save
    # during the epoch's validation: handled at the epoch's end, whose save carries the metric
    assert got["validation"]["code"] == 75 and got["validation"]["trained"] == 6
    assert list(got["validation"]["checkpoints"]) == ["step-0000006"]
    assert got["validation"]["checkpoints"]["step-0000006"] is not None
    # during the save: it completes, then the run stops (no second save, no further step)
    assert got["save"]["code"] == 75 and list(got["save"]["checkpoints"]) == ["step-0000006"]
    assert got["save"]["trained"] == 6
    # during the final test: stopped before its first batch, after the last save; the rerun only
    # tests
    assert got["test"]["code"] == 75 and got["test"]["trained"] == 12 and not got["test"]["test"]
    assert "step-0000012" in got["test"]["checkpoints"]
    assert got["test-rerun"] == {**got["test"], "code": 0, "test": True, "report": True}
    # during the report: the run is finished (exit 0, nothing to resume)
    assert got["report"]["code"] == 0 and got["report"]["report"] and got["report"]["trained"] == 12


# ------------------------------------------------------------------------------ damaged checkpoints


def _run(cmd: list[str], leaks: Leaks) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=leaks.env(), capture_output=True, text=True,
                          timeout=600)


def _launcher(leaks: Leaks) -> list[str]:
    """DeepSpeed's launcher (what ``make train`` runs) for 2 CPU ranks."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
            leaks.port(), "--module", "tstl.train.cli"]


def _losses(run: Path) -> dict[int, float]:
    """The last logged training loss of every step (a resumed run logs the replayed steps again)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_a_damaged_deepspeed_checkpoint_is_skipped_with_a_warning(data_dir: Path, tmp_path: Path,
                                                                  leaks: Leaks) -> None:
    """DeepSpeed's own files (ZeRO 1: model states and the optimizer partition): the newest cut
    short -> the rerun resumes from the previous one, on the same trajectory; all damaged -> exit 2
    naming them (issue 21 item 6)."""
    from tests.train.test_robustness import damage

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "tstl.train.cli",
           *_train_args(data_dir, run, "epochs=1", "engine.zero_stage=1",
                        "checkpoint.every_steps=2", "checkpoint.keep_last=5", "val_every=0",
                        "test_at_end=false")]
    first = _run(cmd, leaks)
    assert first.returncode == 0, first.stderr[-3000:]
    want = _losses(run)
    ck = run / "checkpoints"
    tags = ["step-0000002", "step-0000004", "step-0000006"]
    assert sorted(d.name for d in ck.glob("step-*")) == tags
    damage(ck / "step-0000006/mp_rank_00_model_states.pt", "truncate")

    again = _run(cmd, leaks)
    assert again.returncode == 0, again.stderr[-3000:]
    damaged = f"checkpoint {ck / 'step-0000006'} is damaged (mp_rank_00_model_states.pt has"
    assert damaged in again.stderr
    assert f"resumed from {ck / 'step-0000004'}" in again.stderr
    assert _losses(run) == pytest.approx(want, rel=1e-6, abs=1e-7)  # steps 5 and 6 again, alike
    assert (ck / "damaged-step-0000006").is_dir() and (ck / "step-0000006/complete.json").is_file()

    for tag in tags:
        damage(ck / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", "garble")
    none = _run(cmd, leaks)
    assert none.returncode == 2, none.stderr[-3000:]
    errors = [line for line in none.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in none.stderr, none.stderr[-3000:]
    assert f"no usable checkpoint in {ck}" in errors[0]
    assert "does not match its checksum" in errors[0]
    assert f"remove {ck} to train from the start" in errors[0]


# ---------------------------------------------------------------------------------- one error line


def _stalled(data_dir: Path) -> list[str]:
    """A shard source that prints nothing for longer than data.read_timeout_s (the shard list
    comes from it)."""
    return ["data_dir=/nonexistent", "data.read_timeout_s=1", "data.read_retries=0",
            f"data.shard_url_template=pipe:sleep 30; cat {data_dir}/{{dataset}}/shards/{{split}}/"
            "{name}"]


def test_a_stalled_source_ends_with_one_error_line_on_every_rank(data_dir: Path, tmp_path: Path,
                                                                  leaks: Leaks) -> None:
    """Issue 21 item 9: it used to end in a ``[rank0]:`` traceback. Now every rank prints one
    ``error:`` line (cause and fix), the traceback goes to its log file; ``--debug`` prints it too.
    """
    run = tmp_path / "run"
    cmd = [*_launcher(leaks), *_train_args(data_dir, run, *_stalled(data_dir))]
    proc = _run(cmd, leaks)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = sorted(line for line in proc.stderr.splitlines() if line.startswith("error: "))
    assert [e.split(":")[1] for e in errors] == [" rank 0", " rank 1"], proc.stderr[-3000:]
    for r, line in enumerate(errors):
        log = run / "logs" / f"train-rank{r}.log"
        assert "no data for 1 s (data.read_timeout_s)" in line
        assert "raise data.read_timeout_s" in line
        assert f"the traceback is in {log}" in line
        assert "Traceback (most recent call last)" in log.read_text()
    assert "Traceback" not in proc.stderr

    one = [sys.executable, "-m", "tstl.train.cli",
           *_train_args(data_dir, tmp_path / "one", *_stalled(data_dir)), "--debug"]
    debug = _run(one, leaks)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1].startswith("error: ")  # still the last line


# ------------------------------------------------------------------------- killed launcher or rank


def _rank_pids(leaks: Leaks) -> dict[int, int]:
    """{rank: pid} of the live training ranks of this test."""
    found = {}
    for pid in leaks.processes():
        try:
            pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            env = dict(kv.split(b"=", 1) for kv in pairs if b"=" in kv)
        except OSError:
            continue
        if b"RANK" in env and b"tstl.train.cli" in Path(f"/proc/{pid}/cmdline").read_bytes():
            found[int(env[b"RANK"])] = pid
    return found


@pytest.mark.multiproc
@pytest.mark.parametrize("victim", ["launcher", "rank 1"])
def test_a_sigkill_of_the_launcher_or_of_a_rank_leaves_no_process(
        data_dir: Path, tmp_path: Path, leaks: Leaks, victim: str) -> None:
    """SIGKILL of DeepSpeed's runner used to leave launch.py and every rank training on; now the
    ranks see it and stop as on SIGTERM, with a checkpoint. SIGKILL of one rank: the launcher stops
    the others (``leaks``: nothing left either way)."""
    run = tmp_path / "run"
    cmd = [*_launcher(leaks), *_train_args(data_dir, run, "epochs=5000", "val_every=0")]
    runner = subprocess.Popen(cmd, cwd=ROOT, env=leaks.env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        metrics = run / "metrics.jsonl"
        while not (metrics.exists() and "train/loss" in metrics.read_text()):
            assert runner.poll() is None, "training ended or never started"
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.1)
        ranks = _rank_pids(leaks)
        assert sorted(ranks) == [0, 1]
        os.kill(runner.pid if victim == "launcher" else ranks[1], signal.SIGKILL)
        runner.wait(timeout=300)
        # the ranks finish their step (and, told by the launcher's end, save) and exit
        leaks.check(grace_s=120)
    finally:
        runner.kill()
        runner.wait()
    if victim == "launcher":  # stopped as preempted: a resumable checkpoint
        assert list(run.glob("checkpoints/step-*/complete.json"))
        logs = [(run / "logs" / f"train-rank{r}.log").read_text() for r in (0, 1)]
        # the first rank to see it stops all
        assert any("the launcher is gone" in log for log in logs)
        assert all("SIGTERM received: checkpoint saved at step" in log for log in logs)
