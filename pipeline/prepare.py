"""The ``prepare-ssv2`` and ``prepare-ucf101`` stages: transcode every listed video and write annotation CSVs.

Outputs under ``<data_dir>/<dataset>/``:

* ``videos/...mp4`` -- the transcoded videos;
* ``manifest.parquet`` -- one row per video (``manifest.part-I-of-N.parquet`` per part when split with ``--part``);
* ``annotations/<split>.csv`` -- ``<video path> <label>`` for every video that transcoded fine (CAST format);
* ``annotations/listed_<split>.csv`` -- every video the release lists, whatever happened to it;
* ``annotations/excluded.txt`` -- videos listed but left out of the CSVs, with the reason;
* ``annotations/classes.txt`` -- class name of label i on line i; SSV2 also ``annotations/test_ids.txt``.

With ``--part i/n`` each machine transcodes its share and writes its own manifest; ``finalize`` (run
automatically when n = 1) merges the manifests and writes the CSVs.

Every stage holds the dataset folder's lock (``tstl.core.lock.dataset_lock``; part runs hold it shared and their
part exclusively) and first removes the temp files a stopped run of the same stage left behind.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from tstl.core.faults import fault_point
from tstl.core.lock import dataset_lock
from pipeline import manifest as mf
from pipeline import ssv2, ucf101
from pipeline.runner import Item, Summary, in_part, run_stage
from pipeline.transcode import TranscodeParams, transcode

logger = logging.getLogger(__name__)


@dataclass
class PrepareOptions:
    """How to run a preparation stage."""

    data_dir: Path
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)
    part: tuple[int, int] = (1, 1)
    timeout: float = 300.0
    retry_failed: bool = False
    params: TranscodeParams = field(default_factory=TranscodeParams)
    wait_lock: bool = False  # queue behind another run holding the dataset folder instead of failing at once


def manifest_path(dataset_dir: Path, part: tuple[int, int]) -> Path:
    i, n = part
    return dataset_dir / ("manifest.parquet" if n == 1 else f"manifest.part-{i}-of-{n}.parquet")


def _write_lines(path: Path, lines: list[str]) -> None:
    """Atomic text write; several parts may write the same (identical) listing concurrently."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = mf.temp_name(path)
    try:
        tmp.write_text("".join(f"{ln}\n" for ln in lines))
        fault_point(f"rename:{path.name}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# Names of the small outputs of each folder (regular expressions), for clearing the temp files of a stopped run.
_ANNOTATION_OUTPUTS = r"classes\.txt|test_ids\.txt|excluded\.txt|[A-Za-z0-9_]+\.csv"
_MANIFEST_OUTPUTS = r"manifest(?:\.part-[0-9]+-of-[0-9]+)?\.parquet"


def _clean_temps(dataset_dir: Path, part: tuple[int, int]) -> None:
    """Remove what a stopped run of this stage left under temporary names (its own name patterns, its folders).

    A part run of n > 1 only clears its own manifest's temps: other parts may be writing the shared listings right
    now (they hold the folder shared); ``finalize`` and 1/1 runs hold it exclusively and clear everything."""
    if part[1] > 1:
        mf.clean_temps(dataset_dir, manifest_path(dataset_dir, part).name.replace(".", r"\."))
        return
    mf.clean_temps(dataset_dir, _MANIFEST_OUTPUTS)
    mf.clean_temps(dataset_dir / "annotations", _ANNOTATION_OUTPUTS)


def _write_listing(ann_dir: Path, classes: list[str], splits: dict[str, list[tuple[str, int]]]) -> None:
    _write_lines(ann_dir / "classes.txt", classes)
    for split, entries in splits.items():
        _write_lines(ann_dir / f"listed_{split}.csv", [f"{path} {label}" for path, label in entries])


def _items(entries: dict[str, list[tuple[str, Path, str]]], dataset_dir: Path, part: tuple[int, int]) -> list[Item]:
    """One item per distinct video (UCF101 lists a video in several splits), restricted to this part."""
    by_key: dict[str, tuple[Path, str, list[str]]] = {}
    for split, rows in entries.items():
        for key, source, out_rel in rows:
            by_key.setdefault(key, (source, out_rel, []))[2].append(split)
    return [Item(key, src, dataset_dir / "videos" / rel, rel, ",".join(splits))
            for key, (src, rel, splits) in sorted(by_key.items()) if in_part(key, part)]


def _run(items: list[Item], dataset_dir: Path, opts: PrepareOptions, desc: str) -> Summary:
    """Transcode under the dataset lock (taken by the caller), then finalize when the run is not split."""
    work = functools.partial(transcode, params=opts.params, timeout=opts.timeout)
    summary = run_stage(items, work, manifest_path(dataset_dir, opts.part), opts.params.as_dict(), jobs=opts.jobs,
                        desc=desc, retry_failed=opts.retry_failed)
    summary.log(desc)
    if opts.part[1] == 1:
        _finalize(dataset_dir)
    else:
        logger.info("part %d/%d done; run `python -m pipeline.cli finalize %s` once every part has finished",
                    *opts.part, dataset_dir)
    return summary


def prepare_ssv2(root: Path, opts: PrepareOptions) -> Summary:
    """Transcode an SSV2 release and write its annotations under ``<data_dir>/ssv2``."""
    ann = ssv2.read_annotations(root)  # bad metadata stops the stage before anything is written
    out = opts.data_dir / "ssv2"
    with dataset_lock(out, "prepare-ssv2", wait=opts.wait_lock, part=opts.part):
        return _prepare_ssv2(root, ann, out, opts)


def _prepare_ssv2(root: Path, ann: ssv2.SSV2Annotations, out: Path, opts: PrepareOptions) -> Summary:
    _clean_temps(out, opts.part)
    _write_listing(out / "annotations", ann.classes, {s: [(f"{v}.mp4", y) for v, y in e] for s, e in ann.splits.items()})
    _write_lines(out / "annotations" / "test_ids.txt", ann.test_ids)
    videos = ssv2.video_dir(root)
    entries = {split: [(vid, videos / f"{vid}.webm", f"{vid}.mp4") for vid, _ in rows]
               for split, rows in ann.splits.items()}
    entries["test"] = [(vid, videos / f"{vid}.webm", f"{vid}.mp4") for vid in ann.test_ids]
    return _run(_items(entries, out, opts.part), out, opts, "prepare-ssv2")


def prepare_ucf101(root: Path, opts: PrepareOptions) -> Summary:
    """Transcode a UCF101 release and write the annotations of its three splits under ``<data_dir>/ucf101``."""
    ann = ucf101.read_annotations(root)  # bad metadata stops the stage before anything is written
    out = opts.data_dir / "ucf101"
    with dataset_lock(out, "prepare-ucf101", wait=opts.wait_lock, part=opts.part):
        return _prepare_ucf101(root, ann, out, opts)


def _prepare_ucf101(root: Path, ann: ucf101.UCF101Annotations, out: Path, opts: PrepareOptions) -> Summary:
    _clean_temps(out, opts.part)
    as_mp4 = {rel: rel.rsplit(".", 1)[0] + ".mp4" for rows in ann.splits.values() for rel, _ in rows}
    _write_listing(out / "annotations", ann.classes, {s: [(as_mp4[r], y) for r, y in e] for s, e in ann.splits.items()})
    videos = ucf101.video_dir(root)
    entries = {split: [(rel.rsplit(".", 1)[0], ucf101.resolve(videos, rel), as_mp4[rel]) for rel, _ in rows]
               for split, rows in ann.splits.items()}
    return _run(_items(entries, out, opts.part), out, opts, "prepare-ucf101")


def finalize(dataset_dir: Path, wait_lock: bool = False) -> dict[str, int]:
    """Merge part manifests (if any) and write the annotation CSVs of the videos that transcoded fine."""
    if not (dataset_dir / "annotations").is_dir():
        raise RuntimeError(f"{dataset_dir}: no annotations/ folder; run prepare-ssv2 or prepare-ucf101 with "
                           "--data-dir pointing at the folder above it first")
    with dataset_lock(dataset_dir, "finalize", wait=wait_lock):
        _clean_temps(dataset_dir, (1, 1))
        return _finalize(dataset_dir)


def _finalize(dataset_dir: Path) -> dict[str, int]:
    parts = sorted(dataset_dir.glob("manifest.part-*-of-*.parquet"))
    if parts:
        counts = {p.name.rsplit("-of-", 1)[1].split(".")[0] for p in parts}
        if len(counts) != 1 or len(parts) != int(next(iter(counts))):
            raise RuntimeError(f"{dataset_dir}: found {[p.name for p in parts]}; every part i/n must have finished "
                               "(and all with the same n) before finalize")
        mf.merge(parts, dataset_dir / "manifest.parquet")
    status = {row["output"]: (row["status"], row.get("error") or "")
              for row in mf.read_rows(dataset_dir / "manifest.parquet")}
    ann_dir = dataset_dir / "annotations"
    written, excluded = {}, []
    for listed in sorted(ann_dir.glob("listed_*.csv")):
        split = listed.stem.removeprefix("listed_")
        keep = []
        for line in listed.read_text().splitlines():
            path = line.rsplit(" ", 1)[0]
            st, err = status.get(path, ("not processed", "no manifest row: rerun the prepare stage"))
            if st == "ok":
                keep.append(line)
            else:
                excluded.append(f"{split}\t{path}\t{st}\t{err}")
        _write_lines(ann_dir / f"{split}.csv", keep)
        written[split] = len(keep)
    _write_lines(ann_dir / "excluded.txt", excluded)
    logger.info("%s annotations: %s; %d listed videos excluded (see %s)", dataset_dir.name,
                ", ".join(f"{k} {v}" for k, v in written.items()), len(excluded), ann_dir / "excluded.txt")
    return written
