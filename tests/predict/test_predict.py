"""``tstl predict`` against ``tstl eval`` on one trained run: raw .webm files (transcoded like the
prepare stage) and the shard set give eval's probabilities; ``eval --dump`` holds the per-view
logits they merge from; failures are listed and set the exit code; a TSTL run routes through its
selector and experts as ``eval-tstl`` does; the exported ONNX file and the docs' script give
predict's top-1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import ROOT, TINY, subprocess_env
from tests.predict.conftest import CONFIGS, perturb_
from tstl.core.config import dump_yaml, load_cli_config
from tstl.core.ffmpeg import ffmpeg_exe
from tstl.models import create_model, load_checkpoint
from tstl.predict import Predictor
from tstl.predict.inputs import PrepareRule, prepare_file
from tstl.train.config import TrainConfig

TOL = 1e-5  # the same views in other batches: float sums in another order, nothing more


def _cli(*args: object, timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tstl.cli", *map(str, args)], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=timeout,
                          **kw)


def _val(data_dir: Path) -> dict[str, int]:
    """Validation video id -> label (``annotations/val.csv``: ``<id>.mp4 <label>``)."""
    lines = (data_dir / "ssv2/annotations/val.csv").read_text().splitlines()
    return {name.removesuffix(".mp4"): int(label) for name, label in map(str.split, lines)}


def _raw(data_dir: Path, vid: str) -> Path:
    return data_dir / "raw/ssv2/20bn-something-something-v2" / f"{vid}.webm"


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def dump(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """``tstl eval --dump`` of the run: its rows by key, and the file's metadata."""
    out = tmp_path_factory.mktemp("eval") / "report"
    proc = _cli("eval", "--checkpoint", trained_run, "--out", out, "--dump")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["dump"] == str(out / "views.parquet")
    table = pq.read_table(out / "views.parquet")
    meta = json.loads(table.schema.metadata[b"tstl"])
    return {r["key"]: r for r in table.to_pylist()}, meta


def test_eval_dump_holds_every_view_and_the_merged_probabilities(dump: tuple,
                                                                  data_dir: Path) -> None:
    rows, meta = dump
    classes = (data_dir / "ssv2/annotations/classes.txt").read_text().splitlines()
    assert meta == {"merge_rule": "mean_softmax", "classes": classes}
    assert {k: r["label"] for k, r in rows.items()} == _val(data_dir)
    for r in rows.values():
        logits = np.array(r["logits"])
        assert r["views"] == [0, 1, 2, 3] and logits.shape == (4, 4)  # 2 x 2 views, 4 classes
        np.testing.assert_allclose(r["probs"], _softmax(logits).mean(0), rtol=0, atol=1e-6)
        assert r["pred"] == int(np.argmax(r["probs"]))
    # the perturbed run scores videos differently: agreement below is not agreement on a constant
    assert np.ptp([r["probs"] for r in rows.values()], axis=0).max() > 1e-3


def test_predict_on_raw_webm_files_agrees_with_eval(trained_run: Path, data_dir: Path, dump: tuple,
                                                    tmp_path: Path) -> None:
    """The done-when of issue 23 on the test run: the raw .webm files, listed in a text file, get
    eval's top-1 (and its probabilities) for every video."""
    val = _val(data_dir)
    listing = tmp_path / "videos.txt"
    listing.write_text("# the validation videos\n" + "".join(f"{_raw(data_dir, v)}\n" for v in val))
    out = tmp_path / "pred.jsonl"
    proc = _cli("predict", "--checkpoint", trained_run, listing, "--out", out, "--top-k", 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    rows, meta = dump
    classes = meta["classes"]
    assert [Path(r["source"]).stem for r in records] == list(val)
    for r in records:
        want = rows[Path(r["source"]).stem]
        assert r["top"][0]["class"] == classes[want["pred"]]
        got = {t["class"]: t["prob"] for t in r["top"]}
        np.testing.assert_allclose([got[c] for c in classes], want["probs"], rtol=0, atol=TOL)
        assert r["views"] == 4
        assert f"{r['source']}: {r['top'][0]['class']}" in proc.stdout  # and on the terminal
    assert not out.with_name(out.name + ".partial").exists()


def _shard_samples(data_dir: Path) -> list[dict]:
    from tstl.data.reader import SampleReader
    from tstl.data.sources import resolve

    shards = resolve(data_dir / "ssv2/shards/val")
    return SampleReader(shards).fetch(shards.rows)


def test_the_transcode_reproduces_the_prepared_file_byte_for_byte(data_dir: Path) -> None:
    """Why raw files agree with shards: predict runs the prepare stage's own transcode."""
    samples = {s["__key__"]: s for s in _shard_samples(data_dir)}
    for vid in list(_val(data_dir))[:2]:
        video = prepare_file(_raw(data_dir, vid), PrepareRule(height=240))
        assert video.data == (data_dir / "ssv2/videos" / f"{vid}.mp4").read_bytes()
        assert video.frames == json.loads(samples[vid]["json"])["frames"]


def test_predict_api_on_the_shard_set_agrees_with_eval(trained_run: Path, data_dir: Path,
                                                       dump: tuple) -> None:
    rows, _ = dump
    preds = Predictor(trained_run, device="cpu").predict([data_dir / "ssv2/shards/val"])
    assert sorted(p.key for p in preds) == sorted(_val(data_dir))
    for p in preds:
        assert p.ok and p.label == rows[p.key]["label"] and p.views == 4
        np.testing.assert_allclose(p.probs, rows[p.key]["probs"], rtol=0, atol=TOL)


def test_failed_videos_are_listed_and_set_the_exit_code(trained_run: Path, data_dir: Path,
                                                        tmp_path: Path) -> None:
    good = _raw(data_dir, next(iter(_val(data_dir))))
    (tmp_path / "empty.mp4").write_bytes(b"")
    data = good.read_bytes()
    (tmp_path / "cut.webm").write_bytes(data[:len(data) * 4 // 5])  # a broken download
    (tmp_path / "text.avi").write_bytes(b"not a video " * 200)
    out = tmp_path / "pred.csv"
    args = ["predict", "--checkpoint", trained_run, "--top-k", 2, "--quiet"]
    proc = _cli(*args, good, tmp_path, "--out", out)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "3 of 4 videos failed" in proc.stderr
    lines = proc.stderr.splitlines()
    for name, why in (("empty.mp4", "zero-byte file"), ("cut.webm", "truncated"),
                      ("text.avi", "not a readable")):
        assert any(name in line and why in line for line in lines), (name, proc.stderr[-2000:])
    rows = out.read_text().splitlines()
    assert rows[0] == "source,key,label,scope,start,end,error,class_1,prob_1,class_2,prob_2"
    assert len(rows) == 5 and sum(",video,,," in r for r in rows) == 3  # failed: no times, why
    missing = _cli(*args, tmp_path / "nope.mp4")
    assert missing.returncode == 2 and "error: input not found" in missing.stderr


def _tstl_run(data_dir: Path, root: Path) -> Path:
    """A TSTL run folder as ``train_two_stage`` leaves it (groups.json, selector/ with its
    config.yaml and stage file, expert_NN/ stage files), written with the trainer's own writers
    from random (perturbed) weights."""
    from tstl.twostage.groups import ClassGroups, save_groups
    from tstl.twostage.stagefile import frozen_sources_from_paths, save_stage_file
    from tstl.twostage.stages import expert_file, selector_file

    run = root / "tstl"
    init = root / "init.pt"
    trunk = perturb_(create_model("bcast_test", num_classes=4), seed=1)
    torch.save({"model": trunk.state_dict()}, init)
    save_groups(ClassGroups(((0, 3), (1, 2)), 4), run / "groups.json")
    frozen = frozen_sources_from_paths([init])
    stages = [selector_file(run), expert_file(run, 0), expert_file(run, 1)]  # 2 outputs each
    for seed, path in enumerate(stages):
        model = create_model("bcast_test", num_classes=2)
        load_checkpoint(model, init, reinit_mismatched=("head.",))
        gen = torch.Generator().manual_seed(10 + seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:  # the trainable part (adapters, head): what a stage trains
                    p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_stage_file(model, path, "bcast_test", {"num_classes": 2}, frozen)
    cfg = load_cli_config(TrainConfig, CONFIGS, [*TINY, f"data_dir={data_dir}",
                                                 "model.num_classes=2",
                                                 f"out_dir={run / 'selector'}"])
    dump_yaml(cfg, run / "selector/config.yaml")
    return run


@pytest.mark.parametrize("routing", ["hard", "soft"])
def test_a_tstl_run_routes_each_view_as_eval_tstl(data_dir: Path, tmp_path: Path,
                                                  routing: str) -> None:
    from tstl.data import build_eval_loader
    from tstl.twostage.evaluate import _field, load_run, predict_routed
    from tstl.twostage.groups import load_groups

    run = _tstl_run(data_dir, tmp_path)
    shards = data_dir / "ssv2/shards/val"
    preds = Predictor(run, device="cpu", routing=routing).predict([shards])
    # what eval-tstl computes on the same shards: its "hard" and "soft" (top-2 of 2 groups) fields
    cfg = load_cli_config(TrainConfig, [run / "selector/config.yaml"])
    models = load_run(run, load_groups(run / "groups.json"))
    views, _ = predict_routed(models, build_eval_loader(cfg.data, shards), torch.device("cpu"),
                              top_k=2)
    want, _ = _field([views], routing)
    assert sorted(p.key for p in preds) == sorted(want)
    for p in preds:
        assert p.ok and abs(float(p.probs.sum()) - 1) < 1e-5
        np.testing.assert_allclose(p.probs, want[p.key], rtol=0, atol=TOL)


def docs_script() -> str:
    """The onnxruntime script of docs/training.md, exactly as printed there."""
    text = (ROOT / "docs/training.md").read_text()
    start = text.index("```python\n", text.index("<!-- onnx-script -->")) + len("```python\n")
    return text[start:text.index("\n```\n", start) + 1]


def test_exported_run_and_the_docs_script_reproduce_predict(trained_run: Path, data_dir: Path,
                                                            tmp_path: Path) -> None:
    """The done-when of issue 23: the ONNX export of a trained B-CAST, run by the docs' script with
    only onnxruntime, numpy, decord and ffmpeg, gives predict's top-1 on the raw .webm files."""
    onnx = tmp_path / "exported/model.onnx"
    proc = _cli("export", "--checkpoint", trained_run, "--out", onnx)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads(onnx.with_suffix(".json").read_text())
    assert meta["check"]["max_abs_diff"] <= 1e-4 and len(meta["classes"]) == 4
    script = tmp_path / "predict_onnx.py"
    script.write_text(docs_script())
    assert "onnxruntime" in script.read_text() and "import torch" not in script.read_text()
    bin_dir = tmp_path / "bin"  # the script calls `ffmpeg`: the one this project uses
    bin_dir.mkdir()
    (bin_dir / "ffmpeg").symlink_to(ffmpeg_exe())
    env = {**subprocess_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    videos = [_raw(data_dir, v) for v in _val(data_dir)]
    preds = {p.source: p for p in Predictor(trained_run, device="cpu").predict(videos)}
    for video in videos:
        run = subprocess.run([sys.executable, str(script), str(onnx), str(video)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        rows = [line.split("\t") for line in run.stdout.splitlines()]
        pred = preds[str(video)]
        assert rows[0][0] == pred.top(1, meta["classes"])[0][0], video
        got = {name: float(p) for name, p in rows}
        np.testing.assert_allclose([got[c] for c in meta["classes"]], pred.probs, rtol=0,
                                   atol=2e-4)
