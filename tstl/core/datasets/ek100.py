"""EPIC-KITCHENS-100 release: long source videos and the official action-segment CSVs (verb, noun).

Raw root (``EK100_ROOT``), as the official downloader (``epic-kitchens-download-scripts``) writes
it: ``<root>/<participant>/videos/<video_id>.MP4`` (or the same under ``<root>/EPIC-KITCHENS/``),
1080p at 50 fps (some 59.94), 100 hours in 700 videos. Annotations: a clone of
``epic-kitchens-100-annotations`` inside the root, or wherever ``EK100_ANNOTATIONS`` points, with
the official files and columns:

* ``EPIC_100_train.csv``, ``EPIC_100_validation.csv``: ``narration_id, participant_id, video_id,
  narration_timestamp, start_timestamp, stop_timestamp, start_frame, stop_frame, narration, verb,
  verb_class, noun, noun_class, all_nouns, all_noun_classes`` (narrations and the list columns may
  hold quoted commas; timestamps ``HH:MM:SS.ff``);
* ``EPIC_100_verb_classes.csv`` (97), ``EPIC_100_noun_classes.csv`` (300): ``id, key, instances,
  category``.

Every narration's ``[start_timestamp, stop_timestamp)`` becomes one clip
``videos/<narration_id>.mp4`` (H.264, short side 256 as CAST's README prepares EK100); a source
video is decoded once for all its narrations (``pipeline/cuts.py``). Output:
``annotations/{train,val}.csv`` in CAST's format, ``<narration_id>,<verb>,<noun>`` (no header),
which CAST's ``dataset/epic.py`` reads unchanged with ``--data_path <DATA_DIR>/ek100/videos
--anno_path <DATA_DIR>/ek100/annotations`` and the shard builder reads through ``CAST_EPIC_CSV``;
the class names per head (``verb_classes.txt``, ``noun_classes.txt``; ``classes.txt`` = the verbs,
the class of the shard samples' ``cls``). The test split (``EPIC_100_test_timestamps.csv``) has no
labels and is not prepared.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tstl.core.datasets.base import Dataset, Entry, Label, Listing, MetadataError, unsafe_id_reason

ANNOTATIONS_VAR = "EK100_ANNOTATIONS"
ANNOTATIONS_REPO = "epic-kitchens-100-annotations"
SPLIT_FILES = {"train": "EPIC_100_train.csv", "val": "EPIC_100_validation.csv"}
CLASS_FILES = {"verb": "EPIC_100_verb_classes.csv", "noun": "EPIC_100_noun_classes.csv"}
HEADS = ("verb", "noun")
SEGMENT_COLUMNS = ("narration_id", "video_id", "start_timestamp", "stop_timestamp", "verb_class",
                   "noun_class")
_NARRATION_ID = re.compile(r"(P[0-9]{2}_[0-9]{2,3})_[0-9]+")
_TIMESTAMP = re.compile(r"([0-9]+):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?")


def id_problem(nid: str) -> str | None:
    """The EK100 id rule (the one place it is written): the safety rule of every dataset, then a
    narration id ``<video_id>_<n>`` with ``video_id`` = ``P<NN>_<NN or NNN>`` (``P01_01_0``,
    ``P01_101_12``)."""
    reason = unsafe_id_reason(nid, max_slashes=0)
    if reason is None and not _NARRATION_ID.fullmatch(nid):
        reason = "not a narration id '<P01_01>_<n>'"
    return reason


def timestamp_ms(text: str) -> int:
    """``HH:MM:SS.ff`` (any number of fraction digits) -> integer milliseconds; ``ValueError``
    otherwise."""
    m = _TIMESTAMP.fullmatch(text.strip())
    if not m:
        raise ValueError(f"timestamp '{text}' is not HH:MM:SS.ff")
    h, mi, s, frac = m.groups()
    return ((int(h) * 60 + int(mi)) * 60 + int(s)) * 1000 + int((frac or "0")[:3].ljust(3, "0"))


@dataclass(frozen=True)
class Narration:
    """One action segment: id, source video, [start, stop) in milliseconds, (verb, noun) classes."""

    nid: str
    video_id: str
    start_ms: int
    stop_ms: int
    verb: int
    noun: int


class CastEpicCsv:
    """CAST's EK100 annotation lines ``<narration_id>,<verb>,<noun>`` (``dataset/epic.py:43-47``
    reads them with ``pd.read_csv(header=None, delimiter=',')`` and appends ``.mp4`` to the id); the
    output is ``<id>.mp4``."""

    def line(self, output: str, label: Label) -> str:
        verb, noun = label if isinstance(label, tuple) else (label, -1)
        return f"{output.removesuffix('.mp4')},{verb},{noun}"

    def parse(self, line: str) -> tuple[str, Label]:
        parts = line.split(",")
        if len(parts) != 3 or not all(p.strip().lstrip("-").isdigit() for p in parts[1:]):
            raise ValueError("not '<narration_id>,<verb class>,<noun class>' (CAST's EK100 format)")
        return f"{parts[0].strip()}.mp4", (int(parts[1]), int(parts[2]))


CAST_EPIC_CSV = CastEpicCsv()


def annotations_dir(root: Path) -> Path:
    """``$EK100_ANNOTATIONS`` when set, else ``<root>/epic-kitchens-100-annotations``."""
    env = os.environ.get(ANNOTATIONS_VAR)
    folder = Path(env) if env else root / ANNOTATIONS_REPO
    if not folder.is_dir():
        raise MetadataError(f"{folder}: folder not found. Clone https://github.com/epic-kitchens/"
                            f"{ANNOTATIONS_REPO} into EK100_ROOT ({root}), or set "
                            f"{ANNOTATIONS_VAR}=<the clone>")
    return folder


def _rows(path: Path, need: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise MetadataError(f"{path}: file not found; it is part of the official "
                            f"{ANNOTATIONS_REPO} repository")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise MetadataError(f"{path}: no column(s) {', '.join(missing)} in the header "
                                f"{reader.fieldnames}; use the file of the official "
                                f"{ANNOTATIONS_REPO} repository")
        return list(reader)


def read_classes(folder: Path, head: str) -> list[str]:
    """Class keys by id from ``EPIC_100_<head>_classes.csv`` (ids 0..n-1, each once)."""
    path = folder / CLASS_FILES[head]
    keys: dict[int, str] = {}
    for n, row in enumerate(_rows(path, ("id", "key")), 2):
        try:
            i = int(row["id"])
        except (TypeError, ValueError):
            raise MetadataError(f"{path}: line {n}: id '{row['id']}' is not an integer") from None
        if i in keys:
            raise MetadataError(f"{path}: line {n}: class id {i} is listed twice")
        keys[i] = row["key"].strip()
    if sorted(keys) != list(range(len(keys))):
        raise MetadataError(f"{path}: class ids must be 0..{len(keys) - 1} without gaps")
    return [keys[i] for i in range(len(keys))]


def _narration(path: Path, n: int, row: dict[str, str], sizes: dict[str, int]) -> Narration:
    nid = (row["narration_id"] or "").strip()
    where = f"{path}: line {n} ({nid or 'no narration_id'})"
    reason = id_problem(nid)
    if reason:
        raise MetadataError(f"{where}: {reason}; fix or remove the line")
    video = (row["video_id"] or "").strip()
    if _NARRATION_ID.fullmatch(nid).group(1) != video:  # type: ignore[union-attr]
        raise MetadataError(f"{where}: video_id '{video}' is not the video the narration id names")
    try:
        start, stop = timestamp_ms(row["start_timestamp"]), timestamp_ms(row["stop_timestamp"])
        labels = {h: int(row[f"{h}_class"]) for h in HEADS}
    except (TypeError, ValueError) as e:
        raise MetadataError(f"{where}: {e} (start/stop_timestamp HH:MM:SS.ff, verb/noun_class "
                            "integers)") from None
    for h, y in labels.items():
        if not 0 <= y < sizes[h]:
            raise MetadataError(f"{where}: {h}_class {y} is not in {CLASS_FILES[h]} "
                                f"(0..{sizes[h] - 1})")
    return Narration(nid, video, start, stop, labels["verb"], labels["noun"])


def read_annotations(folder: Path) -> tuple[dict[str, list[str]], dict[str, list[Narration]]]:
    """(class keys per head, narrations per split) of the official files, validated."""
    heads = {h: read_classes(folder, h) for h in HEADS}
    sizes = {h: len(names) for h, names in heads.items()}
    splits: dict[str, list[Narration]] = {}
    seen: dict[str, str] = {}
    for split, name in SPLIT_FILES.items():
        path = folder / name
        rows = [_narration(path, n, row, sizes)
                for n, row in enumerate(_rows(path, SEGMENT_COLUMNS), 2)]
        for r in rows:
            if r.nid in seen:
                raise MetadataError(f"{path}: narration {r.nid} is listed twice (also in "
                                    f"{seen[r.nid]})")
            seen[r.nid] = name
        splits[split] = rows
    return heads, splits


def video_root(root: Path) -> Path:
    """``<root>/EPIC-KITCHENS`` (the downloader's own folder) if present, else ``<root>``."""
    sub = root / "EPIC-KITCHENS"
    return sub if sub.is_dir() else root


def video_index(root: Path) -> dict[str, Path]:
    """``video_id`` -> file, from one listing of ``<participant>/videos/`` (``.MP4`` as released,
    any case)."""
    found: dict[str, Path] = {}
    for path in sorted(video_root(root).glob("*/videos/*")):
        if path.suffix.lower() == ".mp4" and path.is_file():
            found.setdefault(path.stem, path)
    return found


def listing(root: Path) -> Listing:
    """The release as the prepare stage needs it: one clip ``<narration_id>.mp4`` per narration, cut
    from its video (a video absent from the root gives the path it was expected at: the runner
    records its clips as missing)."""
    # bad metadata stops the stage before anything is written
    heads, splits = read_annotations(annotations_dir(root))
    videos, base = video_index(root), video_root(root)

    def entry(r: Narration) -> Entry:
        expected = base / r.video_id.split("_")[0] / "videos" / f"{r.video_id}.MP4"
        return Entry(r.nid, videos.get(r.video_id, expected), f"{r.nid}.mp4", (r.verb, r.noun),
                     (r.start_ms / 1000, r.stop_ms / 1000))

    return Listing(heads["verb"], {s: [entry(r) for r in rows] for s, rows in splits.items()},
                   heads=heads)


DATASET = Dataset(
    name="ek100", title="EPIC-KITCHENS-100", root_var="EK100_ROOT",
    root_help=f"folder with <participant>/videos/<video_id>.MP4 (or EPIC-KITCHENS/<participant>/"
              f"videos/) and the {ANNOTATIONS_REPO} clone (or set {ANNOTATIONS_VAR})",
    read=listing, id_problem=id_problem, splits=("train", "val"),
    shard_splits=lambda k: ["train", "val"],
    height=None, short_side=256, heads=HEADS, csv_format=CAST_EPIC_CSV, clips_per_source=True)
