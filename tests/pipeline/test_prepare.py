"""End-to-end tests of prepare-ssv2 / prepare-ucf101 on synthetic releases: outputs, resumability,
bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import pyarrow.parquet as pq
import pytest

from pipeline import manifest as mf
from pipeline.cli import main as cli_main
from pipeline.prepare import PrepareOptions, finalize, prepare_ssv2, prepare_ucf101
from pipeline.runner import Item
from pipeline.synthetic import SynthConfig, generate
from pipeline.transcode import TranscodeParams, transcode
from tstl.core.datasets.ssv2 import MetadataError, read_annotations

ROOT = Path(__file__).resolve().parents[2]
CFG = SynthConfig(seed=1, num_classes=4, videos_per_class=4, ucf_groups_per_class=3,
                  ucf_clips_per_group=1, broken_ssv2=3, broken_ucf=1, duration_s=(1.0, 1.5))


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("raw")
    generate(CFG, out, jobs=2)
    return out


@pytest.fixture(scope="module")
def prepared(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    data = tmp_path_factory.mktemp("data")
    summary = prepare_ssv2(raw / "ssv2", PrepareOptions(data_dir=data, jobs=2))
    return data, summary


def _outputs(dataset_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(dataset_dir)): p.read_bytes() for p in sorted(dataset_dir.rglob("*"))
            if p.is_file() and p.suffix in (".mp4", ".csv", ".txt")}


def _reference_rows(path: Path) -> list[tuple[str, int]]:
    """A CSV as CAST's and TSTL's loaders read it
    (``pd.read_csv(anno_path, header=None, delimiter=' ')``, sample = column 0 joined to
    ``--data_path``, label = column 1): exactly two space-separated fields per line."""
    rows = [line.split(" ") for line in path.read_text().splitlines()]
    assert rows and all(len(r) == 2 for r in rows), path
    return [(r[0], int(r[1])) for r in rows]


def test_reference_loaders_read_our_ssv2_output(prepared: tuple[Path, object]) -> None:
    """CAST's SSV2 loader: --data_path DATA_DIR/ssv2/videos, --anno_path DATA_DIR/ssv2/annotations,
    train.csv/val.csv; TSTL's: the same folders, group_all2.csv (train) and valgroup_all2.csv (val
    and test)."""
    data, _ = prepared
    ann, videos = data / "ssv2/annotations", data / "ssv2/videos"
    assert (ann / "group_all2.csv").read_bytes() == (ann / "train.csv").read_bytes()
    assert (ann / "valgroup_all2.csv").read_bytes() == (ann / "val.csv").read_bytes()
    for name in ("train.csv", "val.csv", "group_all2.csv", "valgroup_all2.csv"):
        assert all((videos / sample).is_file() for sample, _ in _reference_rows(ann / name))


def test_ssv2_outputs_follow_the_cast_format(raw: Path, prepared: tuple[Path, object]) -> None:
    data, summary = prepared
    info = json.loads((raw / "synthetic_info.json").read_text())
    broken = set(info["ssv2"]["broken"])
    labels = json.loads((raw / "ssv2/labels/labels.json").read_text())
    expected = {e["id"]: int(labels[e["template"].replace("[", "").replace("]", "")])
                for e in json.loads((raw / "ssv2/labels/train.json").read_text())}
    lines = (data / "ssv2/annotations/train.csv").read_text().splitlines()
    got = {}
    for line in lines:
        path, label = line.split(" ")  # exactly one space
        got[path.removesuffix(".mp4")] = int(label)
    assert got == {k: v for k, v in expected.items() if k not in broken}
    excluded = (data / "ssv2/annotations/excluded.txt").read_text()
    assert all(f"{b}.mp4" in excluded for b in broken) and len(summary.failures) == 3
    classes = (data / "ssv2/annotations/classes.txt").read_text().splitlines()
    assert [labels[c] for c in classes] == [str(i) for i in range(4)]
    test_ids = (data / "ssv2/annotations/test_ids.txt").read_text().split()
    assert test_ids == [e["id"] for e in json.loads((raw / "ssv2/labels/test.json").read_text())]


def test_transcoded_videos_keep_frames_and_rate(raw: Path, prepared: tuple[Path, object]) -> None:
    data, _ = prepared
    rows = {r["key"]: r for r in mf.read_rows(data / "ssv2/manifest.parquet")}
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert ok
    for r in ok[:6]:
        path = data / "ssv2/videos" / r["output"]
        with av.open(str(path)) as c:
            v = c.streams.video[0]
            assert v.codec_context.name == "h264" and v.codec_context.pix_fmt == "yuv420p"
            assert v.height == 240 and v.width % 2 == 0 and not c.streams.audio
            assert sum(1 for _ in c.decode(v)) == r["frames"]
        with av.open(r["source"]) as c:
            assert float(c.streams.video[0].average_rate) == pytest.approx(r["fps"], rel=1e-3)
            # no frame dropped or duplicated
            assert sum(1 for _ in c.decode(video=0)) == r["frames"]
        head = path.read_bytes()[:4096]
        assert (head.find(b"moov") != -1
                and (head.find(b"mdat") == -1 or head.find(b"moov") < head.find(b"mdat")))
    assert set(pq.read_schema(data / "ssv2/manifest.parquet").names) >= {
        "source", "source_size", "source_mtime_ns", "output", "status", "error", "duration",
        "frames", "fps", "width", "height", "params"}


def test_noop_rerun_does_no_work_and_keeps_outputs(
        raw: Path, prepared: tuple[Path, object]) -> None:
    data, _ = prepared
    before = {p: p.stat().st_mtime_ns for p in (data / "ssv2/videos").glob("*.mp4")}
    summary = prepare_ssv2(raw / "ssv2", PrepareOptions(data_dir=data, jobs=2))
    assert summary.done == 0 and summary.skipped == summary.total
    assert len(summary.failures) == 3  # the broken sources are still reported
    assert {p: p.stat().st_mtime_ns for p in (data / "ssv2/videos").glob("*.mp4")} == before


def test_rerun_redoes_missing_changed_broken_and_reparameterised(raw: Path, tmp_path: Path) -> None:
    src = tmp_path / "ssv2"
    shutil.copytree(raw / "ssv2", src)
    data = tmp_path / "data"
    prepare_ssv2(src, PrepareOptions(data_dir=data, jobs=2))
    videos = sorted((data / "ssv2/videos").glob("*.mp4"))
    videos[0].unlink()                                   # missing output
    videos[1].write_bytes(videos[1].read_bytes()[:100])  # broken output
    changed = src / "20bn-something-something-v2" / f"{videos[2].stem}.webm"
    # changed source
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    summary = prepare_ssv2(src, PrepareOptions(data_dir=data, jobs=2))
    assert summary.done == 3
    summary = prepare_ssv2(src,
                           PrepareOptions(data_dir=data, jobs=2, params=TranscodeParams(crf=30)))
    # new parameters: everything is redone, known-bad sources included
    assert summary.done == summary.total
    summary = prepare_ssv2(src, PrepareOptions(data_dir=data, jobs=2,
                                               params=TranscodeParams(crf=30), retry_failed=True))
    assert summary.done == 3 and len(summary.failures) == 3


def test_killed_run_resumes_to_identical_outputs(
        raw: Path, prepared: tuple[Path, object], tmp_path: Path) -> None:
    reference, _ = prepared
    data = tmp_path / "data"
    cmd = [sys.executable, "-m", "pipeline.cli", "prepare-ssv2", "--ssv2-root", str(raw / "ssv2"),
           "--data-dir", str(data), "--jobs", "1", "--max-failure-fraction", "0.5"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = mf.journal_path(data / "ssv2/manifest.parquet")
    deadline = time.monotonic() + 60
    while (time.monotonic() < deadline
            and (not journal.exists() or len(journal.read_text().splitlines()) < 4)):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # it really died mid-run
    assert not (data / "ssv2/manifest.parquet").exists() or journal.exists()
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True).returncode == 0
    assert _outputs(data / "ssv2") == _outputs(reference / "ssv2")
    assert not list((data / "ssv2").rglob(".*tmp*")) and not journal.exists()


def test_names_with_spaces_quotes_and_leading_dash(raw: Path, tmp_path: Path) -> None:
    good = next(p for p in sorted((raw / "ssv2/20bn-something-something-v2").glob("*.webm"))
                if p.stat().st_size > 5000)
    weird = tmp_path / "-v 'odd\" name.webm"
    shutil.copy(good, weird)
    out = tmp_path / "-out 'x\" y.mp4"
    result = transcode(Item("k", weird, out, out.name), TranscodeParams(), timeout=60)
    assert result["status"] == "ok" and out.exists() and result["frames"] > 0


@pytest.mark.parametrize("damage,match", [
    ("malformed", "validation.json: malformed JSON"),
    ("template", "is not in labels.json"),
    ("duplicate", "listed twice"),
    ("no-labels", "labels: folder not found"),
])
def test_bad_metadata_stops_with_a_clear_error(
        raw: Path, tmp_path: Path, damage: str, match: str) -> None:
    src = tmp_path / "ssv2"
    shutil.copytree(raw / "ssv2/labels", src / "labels")
    labels = src / "labels"
    if damage == "malformed":
        (labels / "validation.json").write_text('[{"id": "1",')
    elif damage == "template":
        train = json.loads((labels / "train.json").read_text())
        train[0]["template"] = "Juggling [something]"
        (labels / "train.json").write_text(json.dumps(train))
    elif damage == "duplicate":
        train = json.loads((labels / "train.json").read_text())
        (labels / "validation.json").write_text(json.dumps(train[:1]))
    else:
        shutil.rmtree(labels)
    with pytest.raises(MetadataError, match=match):
        read_annotations(src)
    assert cli_main(["prepare-ssv2", "--ssv2-root", str(src), "--data-dir",
                     str(tmp_path / "d")]) == 2
    assert not (tmp_path / "d").exists()  # nothing half-made


def test_failure_fraction_sets_the_exit_code(raw: Path, tmp_path: Path) -> None:
    args = ["prepare-ssv2", "--ssv2-root", str(raw / "ssv2"), "--data-dir", str(tmp_path), "--jobs",
            "2"]
    assert cli_main(args + ["--max-failure-fraction", "0.05"]) == 1  # 3 of 16 broken
    assert cli_main(args + ["--max-failure-fraction", "0.5"]) == 0


def test_parts_merge_to_the_same_result(raw: Path, prepared: tuple[Path, object],
                                        tmp_path: Path) -> None:
    reference, _ = prepared
    for i in (1, 2):
        prepare_ssv2(raw / "ssv2", PrepareOptions(data_dir=tmp_path, jobs=2, part=(i, 2)))
    assert not (tmp_path / "ssv2/annotations/train.csv").exists()
    finalize(tmp_path / "ssv2")
    assert _outputs(tmp_path / "ssv2") == _outputs(reference / "ssv2")


def test_ucf101_labels_splits_and_case_quirk(raw: Path, tmp_path: Path) -> None:
    summary = prepare_ucf101(raw / "ucf101", PrepareOptions(data_dir=tmp_path, jobs=2))
    assert len(summary.failures) == 1  # the truncated avi
    classes = (tmp_path / "ucf101/annotations/classes.txt").read_text().splitlines()
    lists = raw / "ucf101/ucfTrainTestlist"
    for k in (1, 2, 3):
        test_csv = (tmp_path / f"ucf101/annotations/test_split{k}.csv").read_text().splitlines()
        train_csv = (tmp_path / f"ucf101/annotations/train_split{k}.csv").read_text().splitlines()
        listed = len((lists / f"testlist0{k}.txt").read_text().split()) + len(
            (lists / f"trainlist0{k}.txt").read_text().splitlines())
        assert len(test_csv) + len(train_csv) == listed - 1
        for line in test_csv + train_csv:
            path, label = line.split(" ")
            assert classes[int(label)] == path.split("/")[0]  # 0-based, from the folder
            assert (tmp_path / "ucf101/videos" / path).exists()
    assert any("HandstandPushups/v_HandStandPushups_" in ln for ln in
               (tmp_path / "ucf101/annotations/train_split1.csv").read_text().splitlines())
    # TSTL's UCF101 loader (dataset/datasets.py) opens group1.csv / val_group4.csv in its
    # --anno_path: split 1
    ann = tmp_path / "ucf101/annotations"
    assert (ann / "group1.csv").read_bytes() == (ann / "train_split1.csv").read_bytes()
    assert (ann / "val_group4.csv").read_bytes() == (ann / "test_split1.csv").read_bytes()
    for name in ("group1.csv", "val_group4.csv"):
        assert all((tmp_path / "ucf101/videos" / path).is_file()
                   for path, _ in _reference_rows(ann / name))
