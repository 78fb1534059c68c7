"""The ``prepare-<dataset>`` stages: transcode every listed video and write annotation CSVs.

One function, ``prepare(dataset, root, opts)``, runs every dataset of the registry
(``tstl.core.datasets``): the dataset module reads the release into a ``Listing``; this module does
the rest the same way for all of them. Outputs under ``<data_dir>/<dataset>/``:

* ``videos/...mp4`` -- the transcoded videos;
* ``manifest.parquet`` -- one row per video (``manifest.part-I-of-N.parquet`` per part when split
  with ``--part``);
* ``annotations/<split>.csv`` -- ``<video path> <label>`` for every video that transcoded fine
  (CAST format; the dataset's ``csv_format``: EPIC-KITCHENS writes ``<narration_id>,<verb>,<noun>``
  lines);
* ``annotations/listed_<split>.csv`` -- every video the release lists, whatever happened to it;
* ``annotations/excluded.txt`` -- videos listed but left out of the CSVs, with the reason (missing
  ones included);
* ``annotations/missing.txt`` -- the excluded videos whose source file does not exist, listed apart;
* ``annotations/classes.txt`` -- class name of label i on line i (multi-head datasets: of the
  first head, and ``annotations/<head>_classes.txt`` per head); ``annotations/<split>_ids.txt`` for
  each split without labels (SSV2 ``test_ids.txt``);
* the dataset's extra files for the reference code (TSTL's ``group_all2.csv``..., CAST's
  ``cast/*.csv``).

With ``--part i/n`` each machine transcodes its share and writes its own manifest; ``finalize`` (run
automatically when n = 1) merges the manifests and writes the CSVs. A dataset whose clips are cut
from long source videos (``Dataset.clips_per_source``: EPIC-KITCHENS) decodes each source once for
all its clips (``pipeline.cuts``) and shares the sources, not the clips, among the parts.

Every stage holds the dataset folder's lock (``tstl.core.lock.dataset_lock``; part runs hold it
shared and their part exclusively) and first removes the temp files a stopped run of the same stage
left behind.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import cuts
from pipeline import manifest as mf
from pipeline.runner import Batched, Item, Summary, in_part, run_stage
from pipeline.transcode import TranscodeParams, transcode
from tstl.core.datasets import (
    DATASETS,
    CsvFormat,
    Dataset,
    Entry,
    Listing,
    csv_format,
    get_dataset,
)
from tstl.core.faults import fault_point
from tstl.core.lock import dataset_lock

logger = logging.getLogger(__name__)


@dataclass
class PrepareOptions:
    """How to run a preparation stage."""

    data_dir: Path
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)
    part: tuple[int, int] = (1, 1)
    timeout: float = 300.0
    retry_failed: bool = False
    # None: the dataset's defaults (height 240, or Kinetics' short side 320)
    params: TranscodeParams | None = None
    # queue behind another run holding the dataset folder instead of failing at once
    wait_lock: bool = False


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


# Names of the small outputs of each folder (regular expressions), for clearing the temp files of a
# stopped run.
_ANNOTATION_OUTPUTS = (r"(?:[a-z]+_)?classes\.txt|[A-Za-z0-9]+_ids\.txt|excluded\.txt|missing\.txt|"
                       r"[A-Za-z0-9_]+\.csv")
_MANIFEST_OUTPUTS = r"manifest(?:\.part-[0-9]+-of-[0-9]+)?\.parquet"


def _clean_temps(dataset_dir: Path, part: tuple[int, int]) -> None:
    """Remove what a stopped run of this stage left under temporary names (its own name patterns,
    its folders).

    A part run of n > 1 only clears its own manifest's temps: other parts may be writing the shared
    listings right now (they hold the folder shared); ``finalize`` and 1/1 runs hold it exclusively
    and clear everything."""
    if part[1] > 1:
        mf.clean_temps(dataset_dir, manifest_path(dataset_dir, part).name.replace(".", r"\."))
        return
    mf.clean_temps(dataset_dir, _MANIFEST_OUTPUTS)
    ann = dataset_dir / "annotations"
    for folder in (ann, *(sorted(p for p in ann.iterdir() if p.is_dir()) if ann.is_dir() else ())):
        mf.clean_temps(folder, _ANNOTATION_OUTPUTS)  # subfolders: the reference files (cast/*.csv)


def _write_listing(ann_dir: Path, listing: Listing, fmt: CsvFormat) -> None:
    _write_lines(ann_dir / "classes.txt", listing.classes)
    for head, names in listing.heads.items():
        _write_lines(ann_dir / f"{head}_classes.txt", names)
    for split, entries in listing.splits.items():
        lines = [fmt.line(e.output, e.label) for e in entries]
        _write_lines(ann_dir / f"listed_{split}.csv", lines)


def _items(entries: dict[str, list[Entry]], dataset_dir: Path, part: tuple[int, int],
           by_source: bool = False) -> list[Item]:
    """One item per distinct video (UCF101 lists a video in several splits), restricted to this
    part; with ``by_source`` the parts share the source videos (by file name, the same on every
    machine), so each part decodes its sources once."""
    by_key: dict[str, tuple[Entry, list[str]]] = {}
    for split, rows in entries.items():
        for e in rows:
            by_key.setdefault(e.key, (e, []))[1].append(split)
    return [Item(key, e.source, dataset_dir / "videos" / e.output, e.output, ",".join(splits),
                 e.segment)
            for key, (e, splits) in sorted(by_key.items())
            if in_part(e.source.name if by_source else key, part)]


def transcode_params(dataset: Dataset, height: int | None = None, short_side: int | None = None,
                     **kw) -> TranscodeParams:
    """The dataset's transcode defaults, or the size the user asked for (``height`` or
    ``short_side``)."""
    if height is None and short_side is None:
        height, short_side = dataset.height, dataset.short_side
    return TranscodeParams(height=height, short_side=short_side, **kw)


def _run(items: list[Item], dataset_dir: Path, opts: PrepareOptions, desc: str,
         dataset: Dataset) -> Summary:
    """Transcode under the dataset lock (taken by the caller), then finalize when the run is not
    split."""
    params = opts.params or transcode_params(dataset)
    if dataset.clips_per_source:
        cut = functools.partial(cuts.cut_clips, params=params, timeout=opts.timeout)
        work = Batched(cuts.plan, cut)
    else:
        work = functools.partial(transcode, params=params, timeout=opts.timeout)
    summary = run_stage(items, work, manifest_path(dataset_dir, opts.part), params.as_dict(),
                        jobs=opts.jobs, desc=desc, retry_failed=opts.retry_failed)
    summary.log(desc)
    if opts.part[1] == 1:
        _finalize(dataset_dir)
    else:
        logger.info("part %d/%d done; run `python -m pipeline.cli finalize %s` once "
                    "every part has finished",
                    *opts.part, dataset_dir)
    return summary


def prepare(dataset: Dataset | str, root: Path, opts: PrepareOptions) -> Summary:
    """Transcode a release of ``dataset`` (a registered name or description) found at ``root`` and
    write its annotations under ``<data_dir>/<dataset name>``."""
    ds = get_dataset(dataset) if isinstance(dataset, str) else dataset
    listing = ds.read(root)  # bad metadata stops the stage before anything is written
    ds.check_listing(listing)
    out = opts.data_dir / ds.name
    desc = f"prepare-{ds.name}"
    with dataset_lock(out, desc, wait=opts.wait_lock, part=opts.part):
        _clean_temps(out, opts.part)
        ann = out / "annotations"
        _write_listing(ann, listing, ds.csv_format)
        for split, rows in listing.unlabelled.items():
            _write_lines(ann / f"{split}_ids.txt", [e.key for e in rows])
        entries = {**listing.splits, **listing.unlabelled}
        items = _items(entries, out, opts.part, ds.clips_per_source)
        return _run(items, out, opts, desc, ds)


def prepare_ssv2(root: Path, opts: PrepareOptions) -> Summary:
    """``prepare("ssv2", ...)`` (kept for the tests, fixtures and the transcode benchmark)."""
    return prepare("ssv2", root, opts)


def prepare_ucf101(root: Path, opts: PrepareOptions) -> Summary:
    """``prepare("ucf101", ...)``."""
    return prepare("ucf101", root, opts)


def finalize(dataset_dir: Path, wait_lock: bool = False) -> dict[str, int]:
    """Merge part manifests (if any) and write the annotation CSVs of the videos that transcoded
    fine."""
    if not (dataset_dir / "annotations").is_dir():
        raise RuntimeError(f"{dataset_dir}: no annotations/ folder; run prepare-<dataset> ("
                           f"{', '.join(DATASETS)}) with --data-dir pointing at the "
                           "folder above it first")
    with dataset_lock(dataset_dir, "finalize", wait=wait_lock):
        _clean_temps(dataset_dir, (1, 1))
        return _finalize(dataset_dir)


def _finalize(dataset_dir: Path) -> dict[str, int]:
    parts = sorted(dataset_dir.glob("manifest.part-*-of-*.parquet"))
    if parts:
        counts = {p.name.rsplit("-of-", 1)[1].split(".")[0] for p in parts}
        if len(counts) != 1 or len(parts) != int(next(iter(counts))):
            raise RuntimeError(f"{dataset_dir}: found {[p.name for p in parts]}; every part i/n "
                               "must have finished (and all with the same n) before finalize")
        mf.merge(parts, dataset_dir / "manifest.parquet")
    status = {row["output"]: (row["status"], row.get("error") or "")
              for row in mf.read_rows(dataset_dir / "manifest.parquet")}
    ann_dir = dataset_dir / "annotations"
    fmt = csv_format(dataset_dir.name)
    written, excluded, missing, csvs = {}, [], [], {}
    for listed in sorted(ann_dir.glob("listed_*.csv")):
        split = listed.stem.removeprefix("listed_")
        keep = []
        for line in listed.read_text().splitlines():
            path = fmt.parse(line)[0]
            st, err = status.get(path,
                                 ("not processed", "no manifest row: rerun the prepare stage"))
            if st == "ok":
                keep.append(line)
            else:
                excluded.append(f"{split}\t{path}\t{st}\t{err}")
                if st == "missing":
                    missing.append(excluded[-1])
        _write_lines(ann_dir / f"{split}.csv", keep)
        written[split], csvs[split] = len(keep), keep
    _write_lines(ann_dir / "excluded.txt", excluded)
    _write_lines(ann_dir / "missing.txt", missing)
    dataset = DATASETS.get(dataset_dir.name)
    for rel, lines in (dataset.reference_files(csvs) if dataset else {}).items():
        _write_lines(ann_dir / rel, lines)
    logger.info("%s annotations: %s; %d listed videos excluded, %d of them missing "
                "their source (see %s, %s)",
                dataset_dir.name, ", ".join(f"{k} {v}" for k, v in written.items()), len(excluded),
                len(missing), ann_dir / "excluded.txt", ann_dir / "missing.txt")
    return written
