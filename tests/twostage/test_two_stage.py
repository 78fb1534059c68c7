"""TSTL end to end on synthetic shards: both stages through the trainer, killed in stage 2 and
resumed, then the routed evaluation next to a single B-CAST."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, TINY, free_port, subprocess_env
from tests.twostage.conftest import write_random_checkpoint
from tstl.models import create_model
from tstl.twostage.stagefile import read_stage_file

CONFIGS = [str(ROOT / f"configs/{f}.yaml") for f in ("data/ssv2", "demo", "tstl/default")]


def _cli(cmd: str, data_dir: Path, run: Path, *extra: str) -> list[str]:
    """A TSTL command on the tiny B-CAST; training starts from the random weights of
    ``_init(run)``."""
    return [sys.executable, "-m", "tstl.twostage.cli", cmd, "--config", *CONFIGS,
            f"data_dir={data_dir}", f"out_dir={run}", "model.freeze_pretrained=true",
            "tstl.num_groups=2", f"tstl.init=[{_init(run)}]", *TINY, *extra]


def _init(run: Path, model: str = "bcast_test") -> Path:
    """Random initial weights beside the run (4 classes: experts take their rows of its head, as of
    a CAST)."""
    path = run.parent / f"init-{model}.pt"
    if not path.exists():
        write_random_checkpoint(path, model, num_classes=4)
    return path


def _labels(stage: Path) -> dict[int, int]:
    """The label map a stage's trainer was given (``<stage>/labels.json``)."""
    return {int(k): v
            for k, v in json.loads((stage / "labels.json").read_text())["label_map"].items()}


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not ready() and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_two_stage_run_killed_in_stage_2_resumes_then_evaluates(data_dir: Path,
                                                                tmp_path: Path) -> None:
    run = tmp_path / "tstl"
    train = _cli("train", data_dir, run, "tstl.selector.epochs=1", "tstl.expert.epochs=2",
                 "tstl.expert.checkpoint.every_steps=1")
    killed = subprocess.Popen(train, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    _kill_when(killed, lambda: any((run / "expert_01/checkpoints").glob("*/complete.json")))
    assert (run / "selector/selector.pt").exists() and (run / "expert_00/expert.pt").exists()
    assert not (run / "expert_01/expert.pt").exists(), "stage 2 finished before it could be killed"
    before = {p: p.stat().st_mtime_ns
              for p in (run / "selector/selector.pt", run / "expert_00/expert.pt")}

    proc = subprocess.run(train, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("selector already trained" in proc.stderr
            and "1 of 2 experts to train (finished: [0])" in proc.stderr)
    # mid-epoch, from its own checkpoint
    assert f"resumed from {run / 'expert_01/checkpoints'}" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before  # finished stages untouched

    # each stage was trained on the right labels of the same shards
    sel_cfg = yaml.safe_load((run / "selector/config.yaml").read_text())
    ex_cfg = yaml.safe_load((run / "expert_01/config.yaml").read_text())
    assert (_labels(run / "selector") == {0: 0, 1: 0, 2: 1, 3: 1}
            and sel_cfg["model"]["num_classes"] == 2)
    assert _labels(run / "expert_01") == {2: 0, 3: 1} and ex_cfg["epochs"] == 2
    # stage files: trainable tensors only, frozen ones by reference to the run's shared initial
    # weights
    payload = read_stage_file(run / "expert_01/expert.pt")
    model = create_model("bcast_test", num_classes=2)
    assert set(payload["trainable"]) == set(model.trainable_state_dict())
    assert (sum(v.numel() for v in payload["trainable"].values())
            < sum(p.numel() for p in model.parameters()) / 4)
    assert [s["path"] for s in payload["frozen"]["checkpoints"]] == [str(_init(run))]

    base = tmp_path / "bcast"
    single = [sys.executable, "-m", "tstl.train.cli", "train", "--config", *CONFIGS[:2],
              f"data_dir={data_dir}", f"out_dir={base}", "epochs=1", "test_at_end=false", *TINY]
    assert (subprocess.run(single, cwd=ROOT, env=subprocess_env(), capture_output=True).returncode
            == 0)
    ev = subprocess.run(_cli("eval", data_dir, run, f"tstl.baseline={base}"), cwd=ROOT,
                        env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    summary = json.loads((run / "eval/metrics.json").read_text())
    assert summary["videos"] == 4 and summary["views"] == 16
    assert set(summary["methods"]) == {"hard", "soft", "oracle", "baseline"}
    assert summary["forwards"]["selector"] == 16 and sum(summary["forwards"]["hard_routed"]) == 16
    assert [e["videos"] for e in summary["experts"]] == [2, 2]
    report = (run / "eval/report.md").read_text()
    assert ("single B-CAST" in report and "hard routing" in report
            and (run / "eval/hard/confusion.png").exists())

    other = subprocess.run(train[:-3] + ["tstl.num_groups=4"], cwd=ROOT, env=subprocess_env(),
                           capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and "started with other class groups" in other.stderr
    assert torch.load(run / "selector/selector.pt", weights_only=True)["format"] == "tstl-stage/v1"


@pytest.mark.multiproc
def test_two_ranks_through_the_deepspeed_launcher(data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "tstl"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           free_port(), "--module", *_cli("train", data_dir, run, "tstl.selector.epochs=1",
                                          "tstl.expert.epochs=1", "engine.zero_stage=1")[2:]]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("selector", "expert_00", "expert_01"):
        marker = json.loads(next((run / stage / "checkpoints").glob("*/complete.json")).read_text())
        assert marker["world_size"] == 2, stage
    assert read_stage_file(run / "expert_01/expert.pt")["extra"]["classes"] == [2, 3]
    ev = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
          free_port(), "--module", *_cli("eval", data_dir, run)[2:]]
    proc = subprocess.run(ev, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "eval/metrics.json").read_text())
    # each rank's share merged on rank 0, padding dropped
    assert summary["videos"] == 4 and summary["views"] == 16
    assert summary["forwards"]["views_run"] >= 16


def test_experts_can_read_per_group_subsets(data_dir: Path, tmp_path: Path) -> None:
    from shard_tools.cli import main as shards_cli

    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"format": "tstl-groups/v1", "num_classes": 4,
                                  "groups": [[3, 0], [1, 2]]}))
    shards = data_dir / "ssv2/shards"
    for g in range(2):  # what a user would run: one subset per group, bytes copied, labels kept
        assert shards_cli(["subset", str(shards / "train"), str(shards / f"train-g{g:02d}"),
                           "--groups", str(groups), "--group", str(g)]) == 0
    run = tmp_path / "tstl"
    proc = subprocess.run(_cli("train", data_dir, run, f"tstl.groups={groups}",
                               "tstl.expert_split=train-g{group:02d}", "tstl.selector.epochs=1",
                               "tstl.expert.epochs=1"),
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = yaml.safe_load((run / "expert_00/config.yaml").read_text())
    assert cfg["train_split"] == "train-g00" and _labels(run / "expert_00") == {3: 0, 0: 1}
    metrics = [json.loads(line)
               for line in (run / "expert_00/metrics.jsonl").read_text().splitlines()]
    # the 6 videos of classes 3 and 0, batch 2
    assert len([m for m in metrics if "train/loss" in m]) == 3


def test_eval_of_released_tstl_checkpoints(data_dir: Path, tmp_path: Path) -> None:
    """TSTL's released files: a CAST-layout selector over groups and CAST-layout experts over all
    classes."""
    torch.manual_seed(0)
    torch.save({"model": create_model("bcast_test", num_classes=2).state_dict()},
               tmp_path / "selector.pth")
    experts = []
    for g in range(2):
        experts.append(tmp_path / f"expert-{g}.pth")
        torch.save({"module": create_model("bcast_test", num_classes=4).state_dict()}, experts[-1])
    groups = tmp_path / "class_grouping.json"  # TSTL's own format
    groups.write_text(json.dumps({"class_to_head": {"0": 0, "1": 0, "2": 1, "3": 1},
                                  "head_to_classes": {"0": [0, 1], "1": [2, 3]},
                                  "head_to_local": {"0": {"0": 0, "1": 1}, "1": {"2": 0, "3": 1}},
                                  "num_heads": 2, "num_classes": 4}))
    run = tmp_path / "released"
    cmd = _cli("eval", data_dir, run) + ["--selector", str(tmp_path / "selector.pth"), "--experts",
                                         # an override after --experts
                                         *map(str, experts), f"tstl.groups={groups}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "eval/metrics.json").read_text())
    assert (summary["videos"] == 4 and summary["num_groups"] == 2
            and "baseline" not in summary["methods"])


def test_tstl_on_timesformer(data_dir: Path, tmp_path: Path) -> None:
    """Any family that keeps the model contract runs TSTL; a TimeSformer has no frozen part, so its
    stage files hold the whole model."""
    run = tmp_path / "tstl-timesformer"
    extra = ["model.name=timesformer_test", f"tstl.init=[{_init(run, 'timesformer_test')}]"]
    proc = subprocess.run(_cli("train", data_dir, run, "tstl.selector.epochs=1",
                               "tstl.expert.epochs=1", *extra),
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = read_stage_file(run / "expert_01/expert.pt")
    model = create_model("timesformer_test", num_classes=2)
    assert (payload["model"] == "timesformer_test"
            and set(payload["trainable"]) == set(model.state_dict()))
    assert _labels(run / "expert_01") == {2: 0, 3: 1}
    ev = subprocess.run(_cli("eval", data_dir, run, *extra), cwd=ROOT, env=subprocess_env(),
                        capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    summary = json.loads((run / "eval/metrics.json").read_text())
    assert (summary["videos"] == 4 and summary["views"] == 16
            and [e["videos"] for e in summary["experts"]] == [2, 2])
