"""Shard building, verification, subsets and the CLI, on tiny mp4s made with ffmpeg."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from shard_tools.build import BuildOptions, build_dataset, read_csv
from shard_tools.cli import main as cli_main
from shard_tools.subset import read_group_map, subset
from shard_tools.tario import iter_samples
from shard_tools.verify import verify
from tstl.core import shards as shardset
from tstl.core.ffmpeg import ffmpeg_exe

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
N_VIDEOS, N_CLASSES = 18, 3


def _mp4(path: Path, frames: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i",
                    f"testsrc2=size=64x48:rate=12:duration={frames / 12},hue=h={seed * 20}", "-c:v",
                    "libx264", "-pix_fmt", "yuv420p", "-threads", "1", "-fflags", "+bitexact", "-y",
                    str(path)], check=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared-layout dataset: videos/, annotations/{train,val}.csv, classes.txt."""
    data = tmp_path_factory.mktemp("data")
    root = data / "ssv2"
    lines = []
    for i in range(N_VIDEOS):
        _mp4(root / "videos" / f"{i + 1}.mp4", 12 + i, i)
        lines.append(f"{i + 1}.mp4 {i % N_CLASSES}")
    (root / "annotations").mkdir()
    (root / "annotations/train.csv").write_text("\n".join(lines[:12]) + "\n")
    (root / "annotations/val.csv").write_text("\n".join(lines[12:]) + "\n")
    (root / "annotations/classes.txt").write_text("a\nb\nc\n")
    return data


def _digests(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*.tar"))}


OPTS = BuildOptions(max_samples=4, jobs=2)


@pytest.fixture(scope="module")
def built(dataset: Path) -> Path:
    build_dataset(dataset, "ssv2", 1, OPTS)
    return dataset / "ssv2/shards"


def test_samples_parts_and_metadata(built: Path, dataset: Path) -> None:
    ss = shardset.load(built / "train")
    assert ss.num_samples == 12 and len(ss.shards) == 3 and ss.classes == ["a", "b", "c"]
    seen = {}
    for info in ss.shards:
        with tarfile.open(built / "train" / info.name) as tar:
            for m in tar.getmembers():
                assert (m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == ""
                        and "." not in m.name.split(".")[0])
        for key, parts in iter_samples(built / "train" / info.name):
            assert sorted(parts) == ["cls", "json", "mp4"]
            meta = json.loads(parts["json"])
            assert parts["mp4"] == (dataset / "ssv2/videos" / meta["source"]).read_bytes()
            assert int(parts["cls"]) == meta["label"] == (int(key) - 1) % N_CLASSES
            assert (meta["frames"] == 12 + int(key) - 1 and meta["width"] == 64
                    and meta["class_name"] == "abc"[meta["label"]])
            seen[key] = info.name
    assert sorted(seen, key=int) == [str(i) for i in range(1, 13)]
    order = [k for info in ss.shards for k, _ in iter_samples(built / "train" / info.name)]
    assert order != sorted(order, key=int)  # training shards are shuffled
    val = [k for info in shardset.load(built / "val").shards
           for k, _ in iter_samples(built / "val" / info.name)]
    assert val == [str(i) for i in range(13, 19)]  # evaluation shards keep the annotation order


def test_manifest_and_index(built: Path) -> None:
    table = pq.read_table(built / "train/manifest.parquet").to_pylist()
    index = json.loads((built / "train/shards.json").read_text())
    assert [r["shard"] for r in table] == [s["name"] for s in index["shards"]]
    assert sum(r["samples"] for r in table) == index["num_samples"] == 12
    hist: dict[str, int] = {}
    for r in table:
        for k, v in json.loads(r["class_hist"]).items():
            hist[k] = hist.get(k, 0) + v
    assert hist == {"0": 4, "1": 4, "2": 4}
    for r in table:
        assert (built / "train" / r["shard"]).stat().st_size == r["bytes"]


def test_rebuild_is_byte_identical_and_repairs_only_damage(
        built: Path, dataset: Path, tmp_path: Path) -> None:
    before = _digests(built / "train")
    again = tmp_path / "copy"
    shutil.copytree(dataset / "ssv2", again / "ssv2", ignore=shutil.ignore_patterns("shards"))
    build_dataset(again, "ssv2", 1, OPTS)
    assert _digests(again / "ssv2/shards/train") == before
    victim = again / "ssv2/shards/train/shard-000001.tar"
    data = bytearray(victim.read_bytes())
    data[2000] ^= 0xFF
    victim.write_bytes(bytes(data))
    keep = (again / "ssv2/shards/train/shard-000000.tar").stat().st_mtime_ns
    build_dataset(again, "ssv2", 1, OPTS)
    assert _digests(again / "ssv2/shards/train") == before
    assert (again / "ssv2/shards/train/shard-000000.tar").stat().st_mtime_ns == keep  # untouched


def test_killed_build_resumes_to_the_same_set(built: Path, dataset: Path, tmp_path: Path) -> None:
    work = tmp_path / "d"
    shutil.copytree(dataset / "ssv2", work / "ssv2", ignore=shutil.ignore_patterns("shards"))
    cmd = [sys.executable, "-m", "shard_tools.cli", "build", "--dataset", "ssv2", "--data-dir",
           str(work), "--max-samples", "1", "--jobs", "1"]
    # A new session, so the kill takes the whole process group (the pool workers too), as a
    # scheduler would.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    out = work / "ssv2/shards/train"
    # the new set is written in a staging folder beside the path users pass
    deadline = time.monotonic() + 60
    while (time.monotonic() < deadline
            and len(list(out.parent.glob(".train.tmp-*/shard-*.tar"))) < 2):
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "shards.json").exists()  # killed before finishing
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True).returncode == 0
    ref = tmp_path / "ref"
    shutil.copytree(dataset / "ssv2", ref / "ssv2", ignore=shutil.ignore_patterns("shards"))
    build_dataset(ref, "ssv2", 1, BuildOptions(max_samples=1, jobs=2))
    assert _digests(out) == _digests(ref / "ssv2/shards/train")
    assert not list(out.glob(".*tmp*")) and not list(out.parent.glob(".*tmp*"))
    assert all(not r.errors for r in verify(out, decode=False))


def test_verify_catches_a_flipped_byte(built: Path, tmp_path: Path) -> None:
    d = tmp_path / "v"
    shutil.copytree(built / "val", d)
    assert all(not r.errors for r in verify(d))
    assert cli_main(["verify", str(d), "--jobs", "1"]) == 0
    shard = d / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    reports = verify(d)
    assert any("sha256" in e for r in reports for e in r.errors)
    assert cli_main(["verify", str(d), "--jobs", "1"]) == 1


def test_subset_by_classes_and_by_tstl_group_map(built: Path, tmp_path: Path) -> None:
    sub = subset(built / "train", tmp_path / "s", [2, 0], remap=True)
    assert sub.num_samples == 8 and sub.classes == ["c", "a"]
    for info in sub.shards:
        for _, parts in iter_samples(tmp_path / "s" / info.name):
            meta = json.loads(parts["json"])
            assert {meta["global_label"]: int(parts["cls"])}.items() <= {2: 0, 0: 1}.items()
    groups = read_group_map(SHARED / "tstl-class_grouping.json")
    assert len(groups) == 15 and sorted(c for g in groups for c in g) == list(range(174))
    gm = tmp_path / "groups.json"
    gm.write_text(json.dumps({"format": "tstl-groups/v1", "num_classes": 3,
                              "groups": [[1], [2, 0]]}))
    assert cli_main(["subset", str(built / "train"), str(tmp_path / "g"), "--groups", str(gm),
                     "--group", "1"]) == 0
    labels = {int(p["cls"]) for i in shardset.load(tmp_path / "g").shards
              for _, p in iter_samples(tmp_path / "g" / i.name)}
    assert labels == {0, 2}
    assert cli_main(["subset", str(built / "train"), str(tmp_path / "r"), "--groups", str(gm),
                     "--group", "1", "--remap"]) == 0
    # local ids in the group file's order, as experts
    assert shardset.load(tmp_path / "r").classes == ["c", "a"]


def test_cast_annotation_files_are_accepted(dataset: Path, tmp_path: Path) -> None:
    rows = read_csv(SHARED / "cast-ssv2-train-first200.csv")
    assert len(rows) == 200 and all(p.endswith(".mp4") and 0 <= y < 174 for p, y in rows)
    # A user's own CSV in the same format, pointing at our videos.
    csv = tmp_path / "mine.csv"
    csv.write_text("1.mp4 5\n2.mp4 7\n")
    (dataset / "ssv2/annotations/classes.txt").read_text()
    sets = build_dataset(tmp_path, "ssv2", 1, OPTS, annotations=[csv],
                         videos=dataset / "ssv2/videos")
    assert sets[0].num_samples == 2 and sets[0].split == "mine"


def test_cli_help_ls_inspect_stats(built: Path, capsys: pytest.CaptureFixture, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit) as e:
        cli_main(["--help"])
    assert e.value.code == 0
    assert cli_main(["ls", str(built / "train")]) == 0
    assert "shard-000000.tar" in capsys.readouterr().out
    assert cli_main(["inspect", str(built / "val"), "--key", "13"]) == 0
    assert '"label": 0' in capsys.readouterr().out
    assert cli_main(["stats", str(built / "train"), "--png", str(built.parent / "s.png")]) == 0
    out = capsys.readouterr().out
    assert "12 samples" in out and (built.parent / "s.png").stat().st_size > 1000
    # without --png the plot goes to the current folder, never into the (checksummed) shard set
    before = sorted(p.name for p in (built / "train").iterdir())
    monkeypatch.chdir(tmp_path)
    assert cli_main(["stats", str(built / "train")]) == 0
    assert ((tmp_path / "train-stats.png").stat().st_size > 1000
            and "train-stats.png" in capsys.readouterr().out)
    assert sorted(p.name for p in (built / "train").iterdir()) == before
    # not prepared
    assert cli_main(["build", "--dataset", "ucf101", "--data-dir", str(built.parent.parent)]) == 2
