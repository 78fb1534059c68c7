"""EPIC-KITCHENS-100: the official CSVs read, narrations cut from their long source videos once per
pass with exact [start, stop) frames, CAST's annotation format, missing and short videos listed with
reasons, and a killed stage rerun to the same bytes.

References: KHU-VLL/CAST@51eb871 ``dataset/epic.py:42-47`` (``pd.read_csv(anno_path, header=None,
delimiter=',')``, column 0 the id, 1 the verb, 2 the noun, ``label_array = [noun, verb]``) and
``:85-86`` (``data_path/<id>.mp4``); the official columns as ``epic-kitchens-100-annotations``'
README lists them (``EPIC_100_train.csv``: narration_id ... all_noun_classes; the class CSVs: id,
key, instances, category).
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from pipeline import cuts
from pipeline import manifest as mf
from pipeline.prepare import PrepareOptions, prepare
from pipeline.runner import Item
from pipeline.synthetic import SynthConfig, generate
from pipeline.transcode import TranscodeParams
from tstl.core.datasets import MetadataError, get_dataset
from tstl.core.datasets import ek100 as ek

ROOT = Path(__file__).resolve().parents[2]
CFG = SynthConfig(seed=5, ek100_train_videos=3, ek100_val_videos=2, ek100_narrations=5)
SMALL = TranscodeParams(height=None, short_side=48, preset="ultrafast")
FAST = ["--jobs", "2", "--short-side", "48", "--preset", "ultrafast", "--max-failure-fraction",
        "0.6"]
VOLATILE = {"processed_at", "output_mtime_ns"}


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("raw")
    info = generate(CFG, out, datasets=("ek100",), jobs=2)["ek100"]
    return out / "ek100", info


@pytest.fixture(scope="module")
def prepared(raw: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("data")
    prepare("ek100", raw[0], PrepareOptions(data_dir=data, jobs=2, params=SMALL))
    return data / "ek100"


def _official(root: Path, name: str) -> list[dict[str, str]]:
    with open(root / ek.ANNOTATIONS_REPO / name, newline="") as f:
        return list(csv.DictReader(f))


def test_the_official_files_read(raw: tuple[Path, dict]) -> None:
    root, _ = raw
    heads, splits = ek.read_annotations(root / ek.ANNOTATIONS_REPO)
    assert heads["verb"] == ["take", "put", "open", "close"] and heads["noun"][0] == "plate"
    rows = _official(root, "EPIC_100_train.csv")
    assert list(rows[0]) == ["narration_id", "participant_id", "video_id", "narration_timestamp",
                             "start_timestamp", "stop_timestamp", "start_frame", "stop_frame",
                             "narration", "verb", "verb_class", "noun", "noun_class", "all_nouns",
                             "all_noun_classes"]
    assert any("," in r["narration"] and "," in r["all_nouns"] for r in rows)  # quoted commas
    by_id = {n.nid: n for n in splits["train"]}
    for r in rows:
        n = by_id[r["narration_id"]]
        assert (n.verb, n.noun) == (int(r["verb_class"]), int(r["noun_class"]))
        assert n.start_ms == ek.timestamp_ms(r["start_timestamp"]) and n.stop_ms > n.start_ms
    assert ek.timestamp_ms("00:01:02.37") == 62_370 and ek.timestamp_ms("01:00:00.5") == 3_600_500
    assert ek.timestamp_ms("00:00:01.089") == 1_089


def _edit(root: Path, tmp: Path, name: str, row: int, **changes: str) -> Path:
    """A copy of the release's annotations with one cell of ``name`` changed."""
    ann = tmp / "ann"
    shutil.copytree(root / ek.ANNOTATIONS_REPO, ann)
    rows = _official(root, name)
    rows[row].update(changes)
    with open(ann / name, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return ann


@pytest.mark.parametrize("change,message", [
    ({"start_timestamp": "0:01.5"}, "not HH:MM:SS.ff"),
    ({"noun_class": "300"}, r"noun_class 300 is not in EPIC_100_noun_classes.csv \(0..2\)"),
    ({"narration_id": "P01_09_0"}, "not the video the narration id names"),
    ({"narration_id": "P01_01/../x_0"}, "'.', '..' or empty path component"),
    ({"narration_id": "P01_01/x_0"}, "path separator"),
])
def test_bad_metadata_names_the_file_and_line(raw: tuple[Path, dict], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, change: dict,
                                              message: str) -> None:
    root, _ = raw
    monkeypatch.setenv(ek.ANNOTATIONS_VAR, str(_edit(root, tmp_path, "EPIC_100_train.csv", 2,
                                                     **change)))
    with pytest.raises(MetadataError, match=message) as err:
        prepare("ek100", root, PrepareOptions(data_dir=tmp_path / "out", jobs=1, params=SMALL))
    assert "EPIC_100_train.csv: line 4" in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing written


def test_annotations_folder_missing_names_both_ways_to_give_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ek.ANNOTATIONS_VAR, raising=False)
    with pytest.raises(MetadataError, match="Clone https://github.com/epic-kitchens/"
                                            "epic-kitchens-100-annotations.*EK100_ANNOTATIONS"):
        ek.listing(tmp_path)


def test_casts_epic_loader_reads_our_annotations(raw: tuple[Path, dict], prepared: Path) -> None:
    """dataset/epic.py:43-47 and :85-86, restated without pandas: ``pd.read_csv(header=None,
    delimiter=',')`` takes every line as data (no header), column 0 the clip id, 1 the verb, 2 the
    noun; each clip is ``data_path/<id>.mp4`` read with decord."""
    import decord

    root, info = raw
    official = {r["narration_id"]: r for name in ("EPIC_100_train.csv", "EPIC_100_validation.csv")
                for r in _official(root, name)}
    for split in ("train", "val"):
        with open(prepared / "annotations" / f"{split}.csv", newline="") as f:
            values = list(csv.reader(f, delimiter=","))
        assert values and all(len(v) == 3 for v in values)  # no header, three columns
        samples = [v[0] for v in values]
        verb = np.array([int(v[1]) for v in values])  # an integer column, as pandas infers it
        noun = np.array([int(v[2]) for v in values])
        label_array = np.stack((noun, verb), axis=1)  # epic.py:47: [noun, verb]
        for nid, (n, v) in zip(samples, label_array):
            assert (v, n) == (int(official[nid]["verb_class"]), int(official[nid]["noun_class"]))
            vr = decord.VideoReader(str(prepared / "videos" / f"{nid}.mp4"), num_threads=1)
            assert len(vr) > 0 and min(vr[0].shape[:2]) == 48
        assert not set(samples) & set(info["failed"])  # missing/short clips are not listed
    assert len(samples) == len(set(samples))


def test_missing_and_short_videos_are_listed_with_reasons(raw: tuple[Path, dict],
                                                          prepared: Path) -> None:
    _, info = raw
    excluded = {line.split("\t")[1]: line.split("\t") for line in
                (prepared / "annotations" / "excluded.txt").read_text().splitlines()}
    assert {k.removesuffix(".mp4") for k in excluded} == set(info["failed"])
    for nid, why in info["failed"].items():
        _split, _path, status, error = excluded[f"{nid}.mp4"]
        if why == "missing":
            assert status == "missing" and f"{info['missing_video']}.MP4" in error
        else:
            assert status == "failed" and "short or truncated" in error and "download" in error
    missing = (prepared / "annotations" / "missing.txt").read_text()
    gone = sum(w == "missing" for w in info["failed"].values())
    assert missing.count(f"{info['missing_video']}.MP4") == gone


def _source_frames(path: Path, start: float, stop: float) -> int:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return sum(1 for f in c.decode(s) if start <= float(f.pts * s.time_base) < stop - 1e-9)


def test_each_clip_holds_exactly_its_segment(raw: tuple[Path, dict], prepared: Path) -> None:
    root, _ = raw
    videos = ek.video_index(root)
    rows = {r["narration_id"]: r for r in _official(root, "EPIC_100_train.csv")}
    checked = 0
    for line in (prepared / "annotations" / "train.csv").read_text().splitlines()[:6]:
        nid = line.split(",")[0]
        r = rows[nid]
        start = ek.timestamp_ms(r["start_timestamp"]) / 1000
        stop = ek.timestamp_ms(r["stop_timestamp"]) / 1000
        with av.open(str(prepared / "videos" / f"{nid}.mp4")) as c:
            frames = c.streams.video[0].frames
        assert frames == _source_frames(videos[r["video_id"]], start, stop), nid
        checked += 1
    assert checked == 6


def test_passes_group_clips_by_source_in_time_order() -> None:
    def item(key: str, src: str, a: float, b: float) -> Item:
        return Item(key, Path(src), Path(f"/o/{key}.mp4"), f"{key}.mp4", "train", (a, b))

    items = [item("v1_2", "v1", 5, 6), item("v1_0", "v1", 1, 2), item("v2_0", "v2", 0, 1),
             item("v1_1", "v1", 1.5, 3), item("v1_3", "v1", 100, 101)]
    passes = cuts.plan_passes(items, max_clips=2, max_gap=30)
    assert [[i.key for i in p] for p in passes] == [["v1_0", "v1_1"], ["v1_2"], ["v1_3"], ["v2_0"]]
    assert [[i.key for i in p] for p in cuts.plan_passes(items)] == [
        ["v1_0", "v1_1", "v1_2"], ["v1_3"], ["v2_0"]]  # the 94 s gap is sought past


def test_clips_do_not_depend_on_how_they_were_grouped(raw: tuple[Path, dict], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """One pass for a whole video, or one per clip (a rerun after a kill), writes the same bytes;
    the source is decoded once per pass."""
    root, _ = raw
    listing = get_dataset("ek100").read(root)
    video = next(p for p in ek.video_index(root).values())
    entries = [e for e in listing.splits["train"] + listing.splits["val"] if e.source == video]
    assert len(entries) >= 4
    runs = []
    real = subprocess.run
    monkeypatch.setattr(subprocess, "run",
                        lambda argv, **kw: (runs.append(argv), real(argv, **kw))[1])
    outputs = {}
    for name, sizes in (("one", [len(entries)]), ("each", [1] * len(entries))):
        items = [Item(e.key, e.source, tmp_path / name / e.output, e.output, "", e.segment)
                 for e in entries]
        runs.clear()
        k = 0
        for n in sizes:
            assert all(r["status"] == "ok" for r in cuts.cut_clips(items[k:k + n], SMALL, 60))
            k += n
        assert len([a for a in runs if "-filter_complex" in a]) == len(sizes)  # one decode per pass
        outputs[name] = {i.key: i.output.read_bytes() for i in items}
    assert outputs["one"] == outputs["each"]


def test_parts_share_sources_not_clips(raw: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = raw
    for i in (1, 2, 3):
        prepare("ek100", root, PrepareOptions(data_dir=tmp_path, jobs=1, part=(i, 3), params=SMALL))
    sources: dict[str, set[str]] = {}
    for i in (1, 2, 3):
        for row in mf.read_rows(tmp_path / "ek100" / f"manifest.part-{i}-of-3.parquet"):
            sources.setdefault(Path(row["source"]).name, set()).add(str(i))
    assert sources and all(len(parts) == 1 for parts in sources.values())


# --------------------------------------------------------------------------------------------- kill


def _run(args: list[str], env_extra: dict | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TSTL_FAULT")}
    env.update(PYTHONPATH=str(ROOT), **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _snapshot(dataset_dir: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for p in sorted(dataset_dir.rglob("*")):
        if not p.is_file() or p.name.startswith(".tstl.lock"):
            continue
        rel = str(p.relative_to(dataset_dir))
        if p.name.endswith(".parquet"):
            out[rel] = [{k: v for k, v in row.items() if k not in VOLATILE}
                        for row in mf.read_rows(p)]
        else:
            out[rel] = p.read_bytes()
    return out


def _kill_after(proc: subprocess.Popen, trace: Path, entries: int) -> None:
    """SIGKILL ``proc`` once its fault trace holds ``entries`` lines: a moment chosen by count, not
    at a named point (the stage goes on between its trace write and the signal)."""
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if trace.exists() and len(trace.read_text().split()) >= entries:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(timeout=60)


def test_a_stage_killed_at_a_random_moment_reruns_to_the_same_bytes(raw: tuple[Path, dict],
                                                                      tmp_path: Path) -> None:
    root, _ = raw
    args = ["prepare-ek100", "--root", str(root), *FAST]
    trace = tmp_path / "trace"
    ref = _run([*args, "--data-dir", str(tmp_path / "ref")], {"TSTL_FAULT_TRACE": str(trace)})
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-2000:]
    points = trace.read_text().split()
    assert points.count("rename:video") >= 20
    rng = random.Random(int(os.environ.get("TSTL_TEST_SEED", "0")))
    k = rng.randrange(len(points))
    name, hit = points[k], points[:k + 1].count(points[k])
    for how in ("point", "count"):
        out = tmp_path / how
        if how == "point":  # SIGKILL at the hit-th pass through a random crash point of the stage
            killed = _run([*args, "--data-dir", str(out)], {"TSTL_FAULT_AT": f"{name}#{hit}"})
            killed.wait(timeout=300)
        else:
            own = tmp_path / f"trace-{how}"
            killed = _run([*args, "--data-dir", str(out)], {"TSTL_FAULT_TRACE": str(own)})
            _kill_after(killed, own, rng.randrange(1, len(points) // 2))
        assert killed.returncode == -signal.SIGKILL, (how, name, hit)
        rerun = _run([*args, "--data-dir", str(out)])
        assert rerun.wait(timeout=300) == 0, rerun.stderr.read()[-2000:]
        assert _snapshot(out / "ek100") == _snapshot(tmp_path / "ref" / "ek100"), (how, name, hit)
        assert not [p for p in (out / "ek100").rglob("*") if ".tmp-" in p.name], how


# ----------------------------------------------------------------------------------- shards, loader


@pytest.fixture(scope="module")
def sharded(prepared: Path) -> Path:
    from shard_tools.build import BuildOptions, build_dataset

    build_dataset(prepared.parent, "ek100", 1, BuildOptions(max_samples=4, jobs=1))
    return prepared / "shards"


def test_shards_hold_both_labels_and_per_head_counts(prepared: Path, sharded: Path) -> None:
    import json

    from shard_tools.tario import iter_samples
    from tstl.core import shards

    ss = shards.load(sharded / "train")
    verbs = (prepared / "annotations" / "verb_classes.txt").read_text().split()
    assert ss.heads == {"verb": verbs, "noun": ["plate", "cup", "knife"]} and ss.classes == verbs
    assert "heads" in json.loads((sharded / "train" / "shards.json").read_text())
    rows = {line.split(",")[0]: line.split(",")
            for line in (prepared / "annotations" / "train.csv").read_text().splitlines()}
    counts = {"verb": {}, "noun": {}}
    for info in ss.shards:
        for key, parts in iter_samples(sharded / "train" / info.name):
            meta = json.loads(parts["json"])
            _, verb, noun = rows[key]
            assert meta["labels"] == {"verb": int(verb), "noun": int(noun)}
            assert int(parts["cls"]) == meta["label"] == int(verb)
            assert meta["class_name"] == verbs[int(verb)]
            for h in counts:
                counts[h][meta["labels"][h]] = counts[h].get(meta["labels"][h], 0) + 1
    assert ss.head_hist() == {h: dict(sorted(c.items())) for h, c in counts.items()}
    assert ss.class_hist() == ss.head_hist()["verb"]


def test_stats_and_subset_per_head(sharded: Path, tmp_path: Path) -> None:
    from shard_tools.stats import report
    from shard_tools.subset import subset
    from tstl.core import shards

    text = report(sharded / "train")
    assert "verb classes" in text and "noun classes" in text and "  plate" in text
    ss = shards.load(sharded / "train")
    knives = ss.head_hist()["noun"][2]
    out = subset(sharded / "train", tmp_path / "knife", [2], head="noun")
    assert out.num_samples == knives and set(out.head_hist()["noun"]) == {2}
    assert out.heads == ss.heads and out.params["head"] == "noun"
    takes = subset(sharded / "train", tmp_path / "take", [0])  # default: the first head, the verb
    assert set(takes.class_hist()) == {0} and takes.num_samples == ss.class_hist()[0]
    with pytest.raises(ValueError, match="no head 'action'"):
        subset(sharded / "train", tmp_path / "x", [0], head="action")
    with pytest.raises(ValueError, match="--remap relabels one-label sets"):
        subset(sharded / "train", tmp_path / "y", [0], remap=True)


def test_the_loader_hands_a_label_per_head(sharded: Path) -> None:
    from tstl.data import DataConfig, build_eval_loader, build_train_loader

    cfg = DataConfig(num_frames=4, sampling="segment", sampling_convention="cast", input_size=32,
                     rand_augment="", reprob=0.0, mixup=0.8, cutmix=1.0, mixup_prob=1.0,
                     mixup_switch_prob=0.0, batch_size=2, eval_batch_size=4, num_workers=0,
                     test_views=(1, 1))
    train = build_train_loader(cfg, sharded / "train")
    assert train.num_classes == {"verb": 4, "noun": 3} and train.classes["noun"][1] == "cup"
    batch = next(iter(train))
    assert set(batch["label"]) == {"verb", "noun"}
    # mixed: soft targets over each head's classes
    assert batch["label"]["verb"].shape == (2, 4) and batch["label"]["noun"].shape == (2, 3)
    batch = next(iter(build_eval_loader(cfg, sharded / "val")))
    assert batch["label"]["noun"].dtype == torch.long and batch["video"].shape[0] == 4
    with pytest.raises(ValueError, match="label_map relabels one-label shard sets"):
        build_train_loader(cfg, sharded / "train", label_map={0: 0, 1: 1})
