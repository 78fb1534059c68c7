"""Kinetics-400 release: the annotation CSVs and the videos in either common distribution layout.

Annotations: ``<root>/annotations/{train,val,test}.csv`` (or ``<root>/{train,val,test}.csv``) with
the header ``label,youtube_id,time_start,time_end,split`` and, in some releases, ``is_cc``. Labels
are 0..399 by *sorted* class name (the convention of every public K400 loader; written to
``classes.txt``). A CSV whose ``label`` column is empty (the original test release) gives unlabelled
ids, kept apart as the SSV2 test ids are.

Videos, per split, in the first of these that exists:

* flat (CVDF mirror, most re-distributions):
  ``<root>/<split>/<youtube_id>_<start:06d>_<end:06d>.mp4``;
* class folders (the original crawler):
  ``<root>/<split>/<class name>/<youtube_id>_<start:06d>_<end:06d>.mp4``, the folder named with
  spaces, underscores or quotes as the various tools write it;
* untrimmed downloads: ``<root>/<split>/[<class>/]<youtube_id>.<ext>`` holding the whole YouTube
  video, which the stage cuts to ``[time_start, time_end]``.

Missing videos are normal (YouTube removals: a few percent of every copy) and are listed apart from
broken ones: status ``missing`` in the manifest, ``annotations/missing.txt``, their own count in the
summary, and they do not count against ``--max-failure-fraction`` (they have their own limit,
``--max-missing-fraction``, default 0.25).

Output (``<DATA_DIR>/kinetics400``): ``videos/<split>/<name>.mp4`` (H.264, short side 320 by
default), ``annotations/{train,val}.csv`` (``<split>/<name>.mp4 <label>``; also ``test.csv`` when
the test CSV has labels, else ``test_ids.txt``), ``classes.txt``, and
``annotations/cast/{train,val}.csv`` with bare ``<name>.mp4`` for CAST's loader, which joins
``data_path/train/<file>`` and ``data_path/val/<file>``
(``--data_path <DATA_DIR>/kinetics400/videos --anno_path <DATA_DIR>/kinetics400/annotations/cast``).
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from tstl.core.datasets.base import Dataset, Entry, Listing, MetadataError, unsafe_id_reason

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi")
NUM_CLASSES = 400
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{11}$")  # a YouTube video id
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{11}_[0-9]{6}_[0-9]{6}")


def id_problem(name: str) -> str | None:
    """The Kinetics-400 id rule (the one place it is written): the safety rule of every dataset,
    then the distribution's clip name ``<11-character YouTube id>_<start:06d>_<end:06d>``."""
    reason = unsafe_id_reason(name, max_slashes=0)
    if reason is None and not _NAME_RE.fullmatch(name):
        reason = "not '<youtube_id>_<start:06d>_<end:06d>'"
    return reason


@dataclass(frozen=True)
class Clip:
    """One annotated clip: the YouTube video, the segment and the class label (-1 when the CSV has
    none)."""

    youtube_id: str
    start: int
    end: int
    label: int

    @property
    def name(self) -> str:
        """The distribution's file stem ``<youtube_id>_<start:06d>_<end:06d>``."""
        return f"{self.youtube_id}_{self.start:06d}_{self.end:06d}"


@dataclass
class K400Annotations:
    classes: list[str]                 # class names by label (sorted)
    splits: dict[str, list[Clip]]      # labelled clips per split
    unlabelled: dict[str, list[Clip]]  # clips of splits whose CSV has no labels (label -1)


def class_key(name: str) -> str:
    """A class name as every layout spells it the same: lower case, spaces for underscores, no
    quotes."""
    return re.sub(r"\s+", " ",
                  name.replace("_", " ").replace('"', "").replace("'", "")).strip().lower()


def _csv_path(root: Path, split: str) -> Path | None:
    for path in (root / "annotations" / f"{split}.csv", root / f"{split}.csv"):
        if path.is_file():
            return path
    return None


def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"youtube_id", "time_start", "time_end"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise MetadataError(f"{path}: expected the header "
                                "label,youtube_id,time_start,time_end,split[,is_cc]; "
                                f"got {reader.fieldnames}. Use the annotation CSVs of the "
                                "Kinetics-400 release")
        rows = []
        for row in reader:
            problem = _field_count_problem(row)
            if problem:
                raise MetadataError(f"{path}: line {reader.line_num}: {problem}; fix or remove the "
                                    "line")
            rows.append(row)
        return rows


def _field_count_problem(row: dict) -> str | None:
    """csv.DictReader fills a short row's missing fields with None and puts a long row's extra ones
    under the key None: either means the line does not have the header's columns."""
    header = [k for k in row if k is not None]
    got = sum(row[k] is not None for k in header) + len(row.get(None) or [])
    if got != len(header):
        return f"{got} fields, the header has {len(header)} ({','.join(header)})"
    return None


def _clip(path: Path, n: int, row: dict[str, str], label: int) -> Clip:
    vid = (row.get("youtube_id") or "").strip()
    if not _ID_RE.match(vid):
        raise MetadataError(f"{path}: line {n}: youtube_id '{vid}' is not an 11-character "
                            "YouTube id (letters, digits, '-' or '_'); fix or remove the line")
    try:
        start, end = int(float(row["time_start"])), int(float(row["time_end"]))
    except (TypeError, ValueError):
        raise MetadataError(f"{path}: line {n}: time_start/time_end must be seconds, got "
                            f"'{row.get('time_start')}', '{row.get('time_end')}'") from None
    if not 0 <= start < end:
        raise MetadataError(f"{path}: line {n}: segment [{start}, {end}] is empty or negative")
    return Clip(vid, start, end, label)


def read_annotations(root: Path) -> K400Annotations:
    """Read and validate the split CSVs; labels by sorted class name over the labelled splits."""
    found = {s: p for s in SPLITS if (p := _csv_path(root, s)) is not None}
    if "train" not in found and "val" not in found:
        raise MetadataError(f"{root / 'annotations'}: no train.csv or val.csv. K400_ROOT must hold "
                            "annotations/{train,val,test}.csv "
                            "(label,youtube_id,time_start,time_end,split) and the video folders "
                            "train/, val/, test/")
    rows = {s: _read_rows(p) for s, p in found.items()}
    names = sorted({r["label"].strip() for rs in rows.values() for r in rs
                    if (r.get("label") or "").strip()})
    if not names:
        raise MetadataError(f"{root}: no split CSV has labels")
    # a partial CSV would shift every label after the first absent class
    if len(names) != NUM_CLASSES:
        logger.warning("%s: the labelled CSVs name %d classes, Kinetics-400 has %d; labels are "
                       "0..%d by sorted name of these (classes.txt), so they differ from a full "
                       "release's", root, len(names), NUM_CLASSES, len(names) - 1)
    index = {n: i for i, n in enumerate(names)}
    splits: dict[str, list[Clip]] = {}
    unlabelled: dict[str, list[Clip]] = {}
    seen: dict[str, str] = {}
    for split, rs in rows.items():
        labelled = [bool((r.get("label") or "").strip()) for r in rs]
        if any(labelled) and not all(labelled):
            n = labelled.index(False) + 2
            raise MetadataError(f"{found[split]}: line {n} has no label while others do; "
                                "fix the line")
        clips = [_clip(found[split], n + 2, r, index[r["label"].strip()] if labelled[n] else -1)
                 for n, r in enumerate(rs)]
        for c in clips:
            if c.name in seen:
                raise MetadataError(f"{found[split]}: clip {c.name} is listed twice "
                                    f"(also in {seen[c.name]})")
            seen[c.name] = split
        (splits if all(labelled) else unlabelled)[split] = clips
    return K400Annotations(names, splits, unlabelled)


class VideoIndex:
    """Where each clip's file is, over the three layouts, from one listing of each split folder."""

    def __init__(self, root: Path, split: str) -> None:
        self.dir = root / split
        self.trimmed: dict[str, Path] = {}
        self.untrimmed: dict[str, Path] = {}
        if not self.dir.is_dir():
            return
        for path in sorted(self.dir.rglob("*")):
            if path.suffix.lower() not in VIDEO_EXTS or not path.is_file():
                continue
            stem = path.stem
            if _ID_RE.match(stem):
                self.untrimmed.setdefault(stem, path)
            else:
                self.trimmed.setdefault(stem, path)

    def locate(self, clip: Clip) -> tuple[Path, tuple[int, int] | None]:
        """(source file, segment to cut or None). A missing clip gives the path it was expected
        at."""
        if clip.name in self.trimmed:
            return self.trimmed[clip.name], None
        if clip.youtube_id in self.untrimmed:
            return self.untrimmed[clip.youtube_id], (clip.start, clip.end)
        return self.dir / f"{clip.name}.mp4", None


def listing(root: Path) -> Listing:
    """The release as the prepare stage needs it: each clip -> ``<split>/<name>.mp4``, cut when
    untrimmed."""
    ann = read_annotations(root)  # bad metadata stops the stage before anything is written

    def entries(split: str, clips: list[Clip]) -> list[Entry]:
        index = VideoIndex(root, split)
        out = []
        for c in clips:
            source, segment = index.locate(c)
            out.append(Entry(c.name, source, f"{split}/{c.name}.mp4", c.label,
                             (float(segment[0]), float(segment[1])) if segment else None))
        return out

    return Listing(ann.classes, {s: entries(s, c) for s, c in ann.splits.items()},
                   {s: entries(s, c) for s, c in ann.unlabelled.items()})


def reference_files(csvs) -> dict[str, list[str]]:
    """CAST's Kinetics loader (dataset/kinetics.py) opens ``data_path/train/<file>`` and
    ``data_path/val/<file>``: its CSVs hold bare file names, ours hold ``<split>/<name>.mp4`` (what
    our shard builder and TSTL's loader, which joins ``data_path/<file>``, read)."""
    return {f"cast/{split}.csv": [line.split("/", 1)[1] for line in csvs.get(split, [])]
            for split in ("train", "val")}


DATASET = Dataset(
    name="kinetics400", title="Kinetics-400", root_var="K400_ROOT",
    root_help="folder with annotations/{train,val,test}.csv and the video folders train/, val/, "
              "test/ (flat, class folders or untrimmed <youtube_id>.<ext>)",
    read=listing, id_problem=id_problem, splits=SPLITS, shard_splits=lambda k: ["train", "val"],
    height=None, short_side=320, max_missing_fraction=0.25, reference_files=reference_files)
