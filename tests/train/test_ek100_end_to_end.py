"""EPIC-KITCHENS-100 end to end: a synthetic EK100-style release (long videos, several narrations
each) -> prepare-ek100 -> shards with two labels -> a tiny compositional B-CAST trained with the
EK100 recipe's machinery (summed per-head loss, one mixup lambda for both heads) -> multi-view test
and `tstl eval` report verb, noun and action accuracy above chance.

The recipe is configs/data/ek100.yaml + configs/model/bcast_compo_vit_b16.yaml with a tiny model
on tiny clips (the test's speed) and a learning rate for training from scratch (no pre-trained
experts can be downloaded here).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.prepare import PrepareOptions, prepare
from pipeline.synthetic import SynthConfig, generate
from pipeline.transcode import TranscodeParams
from shard_tools.build import BuildOptions, build_dataset
from tests.conftest import ROOT
from tests.conftest import subprocess_env as _env

CONFIGS = [str(ROOT / "configs/data/ek100.yaml"),
           str(ROOT / "configs/model/bcast_compo_vit_b16.yaml")]
TINY = ["model.name=bcast_compo_test", "model.freeze_pretrained=false", "model.drop_path_rate=0",
        "data.num_frames=4", "data.input_size=32", "data.batch_size=4", "data.eval_batch_size=8",
        "data.num_workers=0", "data.test_views=[2,2]", "data.rand_augment=",
        "data.rrc_scale=[0.5,1.0]", "data.mixup_prob=0.5", "engine.precision=fp32",
        "optim.lr=0.064", "optim.min_lr=0.001", "optim.warmup_epochs=1", "optim.layer_decay=1.0",
        "epochs=40", "val_every=0", "log_every=1", "checkpoint.every_epochs=40"]
CHANCE = {"verb": 1 / 4, "noun": 1 / 3, "action": 1 / 12}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ek100")
    info = generate(SynthConfig(seed=0), root / "raw", datasets=("ek100",), jobs=2)["ek100"]
    params = TranscodeParams(height=None, short_side=48, preset="ultrafast")
    summary = prepare("ek100", root / "raw" / "ek100", PrepareOptions(data_dir=root, jobs=2,
                                                                        params=params))
    failed = sorted(key for key, _, _ in summary.failures)
    assert failed == sorted(info["failed"])  # the missing video's clips and the short one's
    build_dataset(root, "ek100", 1, BuildOptions(max_samples=8, jobs=2))
    return root


def test_train_and_evaluate_verb_noun_and_action(data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "tstl.train.cli", "train", "--config", *CONFIGS,
           f"data_dir={data_dir}", f"out_dir={run}", *TINY]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "{'verb': 4, 'noun': 3} classes" in proc.stderr
    metrics = json.loads((run / "test" / "metrics.json").read_text())
    got = {"action": metrics["top1"], **{h: m["top1"] for h, m in metrics["heads"].items()}}
    assert metrics["videos"] == 16
    for what, chance in CHANCE.items():  # measured: verb 0.875, noun 1.0, action 0.875
        assert got[what] > chance + 0.25, (what, got)
    report = (run / "report.md").read_text()
    assert "| metric | verb | noun | action |" in report and "## Verb" in report
    assert (run / "test" / "actions.csv").exists()
    assert (run / "test" / "verb" / "confusion.png").exists()
    # the evaluation CLI on the run reproduces the test
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "tstl.train.cli", "eval", "--checkpoint", str(run),
                           "--out", str(out), f"data_dir={data_dir}"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((out / "metrics.json").read_text())
    assert again["top1"] == pytest.approx(metrics["top1"])
    assert again["heads"]["verb"]["top1"] == pytest.approx(metrics["heads"]["verb"]["top1"])
