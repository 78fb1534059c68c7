"""Something-Something V2 release: find the videos and read the official label JSON files.

Raw root (``SSV2_ROOT``): ``labels/{labels,train,validation,test}.json`` and
``20bn-something-something-v2/<id>.webm``. Output: ``videos/<id>.mp4``,
``annotations/{train,val}.csv``, ``annotations/test_ids.txt``, plus TSTL's names ``group_all2.csv``
(= train.csv) and ``valgroup_all2.csv`` (= val.csv). CAST reads ``annotations/{train,val}.csv`` as
they are (``--data_path <DATA_DIR>/ssv2/videos --anno_path <DATA_DIR>/ssv2/annotations``).

Class of a video = ``labels.json[template with "[" and "]" removed]`` (the ``label`` field is the
instantiated caption and is never used). The test split has no labels in the release; its ids are
kept separately.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tstl.core.datasets.base import Dataset, Entry, Listing, MetadataError, unsafe_id_reason

SPLIT_FILES = {"train": "train.json", "val": "validation.json", "test": "test.json"}
# Older releases named the files something-something-v2-<name>.json next to the videos.
LEGACY_PREFIX = "something-something-v2-"


@dataclass
class SSV2Annotations:
    classes: list[str]                       # class names by label index
    splits: dict[str, list[tuple[str, int]]]  # train/val: (video id, label)
    test_ids: list[str]


def id_problem(vid: str) -> str | None:
    """The SSV2 id rule (the one place it is written): the safety rule of every dataset, then a
    decimal integer (the release names its videos ``<id>.webm``). Returns why ``vid`` breaks it, or
    None."""
    reason = unsafe_id_reason(vid, max_slashes=0)
    if reason is None and not re.fullmatch(r"[0-9]{1,20}", vid):
        reason = "not an integer id"
    return reason


def video_dir(root: Path) -> Path:
    """``<root>/20bn-something-something-v2`` if present, else ``<root>`` itself (videos directly
    under it)."""
    sub = root / "20bn-something-something-v2"
    return sub if sub.is_dir() else root


def _label_file(root: Path, name: str) -> Path:
    new = root / "labels" / f"{name}.json"
    if new.exists():
        return new
    legacy = root / f"{LEGACY_PREFIX}{name}.json"
    if legacy.exists():
        return legacy
    if not (root / "labels").is_dir():
        raise MetadataError(
            f"{root / 'labels'}: folder not found. Put the release's labels.json, train.json, "
            f"validation.json and test.json in {root / 'labels'}/ (SSV2_ROOT must be the "
            "folder that holds labels/ and 20bn-something-something-v2/)")
    raise MetadataError(f"{new}: file not found; the official SSV2 release has labels/{name}.json")


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MetadataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} "
                            f"({e.msg}); re-extract the file from the release archive") from None


def read_classes(root: Path) -> tuple[list[str], dict[str, int]]:
    """Class names by index and the template -> index map from labels.json."""
    path = _label_file(root, "labels")
    data = _load_json(path)
    if not isinstance(data, dict) or not data:
        raise MetadataError(f"{path}: expected an object mapping template text to an index string")
    try:
        mapping = {str(k): int(v) for k, v in data.items()}
    except (TypeError, ValueError):
        raise MetadataError(f"{path}: every value must be a class index such as \"0\"") from None
    indices = sorted(mapping.values())
    if indices != list(range(len(indices))):
        raise MetadataError(f"{path}: class indices must be 0..{len(indices) - 1} without gaps "
                            "or repeats")
    classes = [""] * len(indices)
    for name, i in mapping.items():
        classes[i] = name
    return classes, mapping


def _read_split(path: Path, templates: dict[str, int], labelled: bool) -> list[tuple[str, int]]:
    data = _load_json(path)
    if not isinstance(data, list):
        raise MetadataError(f"{path}: expected a list of entries")
    out = []
    for n, entry in enumerate(data):
        if not isinstance(entry, dict) or "id" not in entry:
            raise MetadataError(f"{path}: entry {n} has no 'id'")
        vid = str(entry["id"])
        reason = id_problem(vid)
        if reason:
            raise MetadataError(f"{path}: entry {n} has id {vid!r}: {reason}; SSV2 ids are "
                                "integers such as \"78687\" (fix or remove the entry)")
        if not labelled:
            out.append((vid, -1))
            continue
        if "template" not in entry:
            raise MetadataError(f"{path}: entry {n} (id {vid}) has no 'template'")
        template = str(entry["template"]).replace("[", "").replace("]", "")
        if template not in templates:
            raise MetadataError(f"{path}: entry {n} (id {vid}): template '{template}' is not in "
                                "labels.json; use the labels.json of the same release")
        out.append((vid, templates[template]))
    return out


def read_annotations(root: Path) -> SSV2Annotations:
    """Read and validate labels/train/validation/test JSON of an SSV2 release."""
    classes, templates = read_classes(root)
    splits, seen = {}, {}
    for split, name in SPLIT_FILES.items():
        path = _label_file(root, name.removesuffix(".json"))
        entries = _read_split(path, templates, labelled=split != "test")
        for vid, _ in entries:
            if vid in seen:
                raise MetadataError(f"{path}: video id {vid} is listed twice "
                                    f"(also in {seen[vid]}); each id must appear in exactly one "
                                    "split")
            seen[vid] = path.name
        splits[split] = entries
    test = splits.pop("test")
    return SSV2Annotations(classes=classes, splits=splits, test_ids=[vid for vid, _ in test])


def listing(root: Path) -> Listing:
    """The release as the prepare stage needs it: ``<id>.webm`` -> ``<id>.mp4``, test ids
    unlabelled."""
    ann = read_annotations(root)  # bad metadata stops the stage before anything is written
    videos = video_dir(root)

    def entry(vid: str, label: int) -> Entry:
        return Entry(vid, videos / f"{vid}.webm", f"{vid}.mp4", label)

    return Listing(ann.classes,
                   {s: [entry(v, y) for v, y in rows] for s, rows in ann.splits.items()},
                   {"test": [entry(v, -1) for v in ann.test_ids]})


def reference_files(csvs) -> dict[str, list[str]]:
    """TSTL's SSV2 loader (dataset/datasets.py) reads ``group_all2.csv`` (train) and
    ``valgroup_all2.csv`` (val and test) from its ``--anno_path``; same lines as ours
    (``<id>.mp4 <label>``, space-delimited)."""
    return {"group_all2.csv": list(csvs.get("train", [])),
            "valgroup_all2.csv": list(csvs.get("val", []))}


DATASET = Dataset(
    name="ssv2", title="Something-Something V2", root_var="SSV2_ROOT",
    root_help="folder with labels/ and 20bn-something-something-v2/ (or the .webm files directly)",
    read=listing, id_problem=id_problem, splits=("train", "val", "test"),
    shard_splits=lambda k: ["train", "val"], height=240, reference_files=reference_files)
