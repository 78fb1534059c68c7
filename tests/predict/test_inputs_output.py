"""What ``tstl predict`` reads (folders, lists, shard sets) and how its ``--out`` file survives a
killed run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tstl.core.exitcodes import UsageError
from tstl.predict.inputs import InputError, PrepareRule, collect
from tstl.predict.output import Writer, record
from tstl.predict.predictor import Prediction, Window

AS_IS = PrepareRule(as_is=True)


def test_folders_lists_and_files_in_order(tmp_path: Path) -> None:
    (tmp_path / "clips/sub").mkdir(parents=True)
    for name in ("clips/b.mp4", "clips/sub/a.WEBM", "clips/notes.md", "other.mkv"):
        (tmp_path / name).write_bytes(b"x")
    listing = tmp_path / "lists/videos.txt"
    listing.parent.mkdir()
    listing.write_text("# one per line, relative to this file\n\n../other.mkv\n../missing.avi\n")
    total, items = collect([tmp_path / "clips", listing, tmp_path / "other.mkv"], AS_IS)
    items = list(items)
    names = [Path(i.source).relative_to(tmp_path).as_posix() for i in items]
    assert total == len(items) == 5
    assert names == ["clips/b.mp4", "clips/sub/a.WEBM", "other.mkv", "missing.avi", "other.mkv"]
    with pytest.raises(InputError, match="file not found"):  # a listed file that is gone: alone
        items[3].load()
    with pytest.raises(InputError, match="not a readable video"):
        items[0].load()


def test_usage_errors_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="input not found"):
        collect([tmp_path / "nope.mp4"], AS_IS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no video files inside"):
        collect([tmp_path / "empty"], AS_IS)


def test_a_shard_set_yields_its_samples_with_labels(shardset) -> None:
    folder = shardset(n=7, per_shard=[3, 4])
    total, items = collect([folder], AS_IS)
    items = list(items)
    assert total == 7 and [i.key for i in items] == [f"v{k:03d}" for k in range(7)]
    assert [i.label for i in items] == [k % 5 for k in range(7)]
    video = items[1].load()
    assert video.frames == 20 and len(video.data) > 1024  # the json's frame count, the mp4 bytes


def _pred(source: str, p: float) -> Prediction:
    probs = np.array([p, 1 - p], dtype=np.float32)
    return Prediction(source, Path(source).stem, probs, views=2, frames=10, fps=10.0, duration=1.0,
                      windows=[Window(0.0, 1.0, probs)])


SETTINGS = {"checkpoint": "/runs/x", "top_k": 2}


def test_a_killed_run_resumes_from_its_partial_file(tmp_path: Path) -> None:
    out = tmp_path / "pred.jsonl"
    classes = ["a", "b"]
    w = Writer(out, SETTINGS, 2)
    w.add(record(_pred("v1.mp4", 0.9), classes, 2))
    w.add(record(Prediction("v2.mp4", "v2", error="truncated"), classes, 2))
    w.close(complete=False)  # killed: the partial file stays
    with open(w.partial, "a") as f:
        f.write('{"source": "v3.mp4", "to')  # the line being written when it was killed
    again = Writer(out, SETTINGS, 2)
    assert again.done == {"v1.mp4"}  # the failed one is tried again, the torn line dropped
    again.add(record(_pred("v2.mp4", 0.2), classes, 2))
    again.close()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in rows] == ["v1.mp4", "v2.mp4"] and "error" not in rows[1]
    assert rows[1]["top"][0] == {"class": "b", "prob": pytest.approx(0.8)}
    assert not w.partial.exists()
    other = Writer(out, {**SETTINGS, "top_k": 1}, 1)  # other settings: nothing reused
    assert other.done == frozenset()


def test_csv_rows_per_video_and_window(tmp_path: Path) -> None:
    out = tmp_path / "pred.csv"
    w = Writer(out, SETTINGS, 2)
    w.add(record(_pred("v1.mp4", 0.9), ["a", "b"], 2))
    w.add(record(Prediction("v2.mp4", "v2", label=1, error="no video frames"), ["a", "b"], 2))
    w.close()
    assert out.read_text().splitlines() == [
        "source,key,label,scope,start,end,error,class_1,prob_1,class_2,prob_2",
        "v1.mp4,v1,,video,0.0,1.0,,a,0.900000,b,0.100000",
        "v1.mp4,v1,,window,0.0,1.0,,a,0.900000,b,0.100000",
        "v2.mp4,v2,1,video,,,no video frames,,,,",
    ]
    with pytest.raises(UsageError, match="end the name with .jsonl or .csv"):
        Writer(tmp_path / "pred.txt", SETTINGS, 2)


def test_the_cli_resumes_a_killed_run_from_its_partial_file(tmp_path: Path, capsys,
                                                            monkeypatch) -> None:
    """Killed after its first video, a rerun with the same arguments keeps what was written and
    predicts the rest: the first record, edited in the partial file, survives into the result."""
    from tests.predict.conftest import colour_video, hand_run
    from tstl.cli import main
    from tstl.predict.predictor import Predictor

    ckpt = hand_run(tmp_path / "run", "bcast_test")
    videos = [colour_video(tmp_path / f"{c}.mp4", [c], 1.0) for c in ("red", "blue")]
    out = tmp_path / "pred.jsonl"
    partial = out.with_name("pred.jsonl.partial")
    args = ["predict", "--checkpoint", str(ckpt), "--config", str(tmp_path / "run/config.yaml"),
            *map(str, videos), "--out", str(out), "--top-k", "1", "--quiet"]
    real = Predictor.iter_predict

    def killed_after_one(self, *a, **k):
        yield next(real(self, *a, **k))
        raise KeyboardInterrupt

    monkeypatch.setattr(Predictor, "iter_predict", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.undo()
    assert not out.exists()
    head, rec = (json.loads(line) for line in partial.read_text().splitlines())
    assert rec["source"] == str(videos[0])
    rec["top"] = [{"class": "planted", "prob": 1.0}]
    partial.write_text(json.dumps(head) + "\n" + json.dumps(rec) + "\n")
    capsys.readouterr()
    assert main(args) == 0
    assert "2 videos predicted (1 of them by an earlier run)" in capsys.readouterr().err
    final = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in final] == list(map(str, videos)) and not partial.exists()
    assert final[0]["top"][0]["class"] == "planted" and final[1]["top"][0]["class"] != "planted"
