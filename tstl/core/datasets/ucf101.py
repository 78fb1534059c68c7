"""UCF101 release: ``UCF-101/<Class>/v_*.avi`` and the ``ucfTrainTestlist`` split files.

Labels are 0-based indices of ``classInd.txt`` (which is 1-based). Train lists carry a label, test
lists do not: the label comes from the class folder. The folder ``HandstandPushups`` holds files
named ``v_HandStandPushups_*``, so the class is always taken from the folder part of the path, never
from the file name.

Output: ``videos/<Class>/v_*.mp4``, ``annotations/{train,test}_split{1,2,3}.csv``, plus TSTL's names
``group1.csv`` (= train_split1.csv) and ``val_group4.csv`` (= test_split1.csv), read with
``--data_path <DATA_DIR>/ucf101/videos --anno_path <DATA_DIR>/ucf101/annotations``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tstl.core.datasets.base import Dataset, Entry, Listing, MetadataError, unsafe_id_reason

SPLITS = (1, 2, 3)


@dataclass
class UCF101Annotations:
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]  # "train_split1" -> [("Class/v_x.avi", label), ...]


# The UCF101 name rule (the one place it is written): ``<Class>/v_<Class>_gNN_cNN.avi``. The class
# part of the file name is not compared with the folder (the release has
# ``HandstandPushups/v_HandStandPushups_*``).
_NAME = re.compile(r"v_[A-Za-z0-9]+_g[0-9]{2,3}_c[0-9]{2,3}\.avi", re.IGNORECASE)


def entry_problem(rel: str) -> str | None:
    """Why the list entry ``rel`` breaks the safety rule or the UCF101 name rule, or None."""
    reason = unsafe_id_reason(rel, max_slashes=1)
    if reason is None and ("/" not in rel or not _NAME.fullmatch(rel.split("/", 1)[1])):
        reason = "not '<Class>/v_<Class>_gNN_cNN.avi'"
    return reason


def key_problem(key: str) -> str | None:
    """The id rule on a listed key (``<Class>/v_<Class>_gNN_cNN``: the entry without its
    ``.avi``)."""
    return entry_problem(f"{key}.avi")


def video_dir(root: Path) -> Path:
    sub = root / "UCF-101"
    return sub if sub.is_dir() else root


def list_dir(root: Path) -> Path:
    d = root / "ucfTrainTestlist"
    if not d.is_dir():
        raise MetadataError(f"{d}: folder not found. Unzip "
                            f"UCF101TrainTestSplits-RecognitionTask.zip into {root} "
                            "(UCF101_ROOT must hold UCF-101/ and ucfTrainTestlist/)")
    return d


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines; numbers count blank lines too, as an
    editor does."""
    if not path.exists():
        raise MetadataError(f"{path}: file not found; it is part of the official ucfTrainTestlist")
    return [(n, ln.strip()) for n, ln in enumerate(path.read_text().split("\n"), 1) if ln.strip()]


def read_classes(lists: Path) -> list[str]:
    path = lists / "classInd.txt"
    classes: dict[int, str] = {}
    for n, line in _lines(path):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise MetadataError(f"{path}: line {n} '{line}' is not '<index> <ClassName>'")
        classes[int(parts[0])] = parts[1]
    if sorted(classes) != list(range(1, len(classes) + 1)):
        raise MetadataError(f"{path}: indices must run 1..{len(classes)} without gaps or repeats")
    return [classes[i] for i in range(1, len(classes) + 1)]


def _read_list(path: Path, index: dict[str, int]) -> list[tuple[str, int]]:
    out, seen = [], set()
    for n, line in _lines(path):
        parts = line.split()
        rel = parts[0]
        folder = rel.split("/")[0]
        reason = entry_problem(rel)
        if reason:
            raise MetadataError(f"{path}: line {n}: {rel!r}: {reason}; fix or remove the line")
        if folder not in index:
            raise MetadataError(f"{path}: line {n}: '{rel}' is not '<Class>/<file>.avi' with a "
                                "class of classInd.txt")
        label = index[folder]
        if len(parts) > 2:
            raise MetadataError(f"{path}: line {n}: '{line}' is not '<Class>/<file>.avi [<label>]'")
        if len(parts) > 1 and not re.fullmatch(r"[0-9]+", parts[1]):
            raise MetadataError(f"{path}: line {n}: label {parts[1]!r} is not an integer "
                                f"(classInd.txt index {label + 1} for '{folder}')")
        if len(parts) > 1 and int(parts[1]) - 1 != label:
            raise MetadataError(f"{path}: line {n}: label {parts[1]} does not match the folder "
                                f"'{folder}' (classInd.txt gives {label + 1})")
        if rel in seen:
            raise MetadataError(f"{path}: line {n}: '{rel}' is listed twice")
        seen.add(rel)
        out.append((rel, label))
    return out


def read_annotations(root: Path) -> UCF101Annotations:
    """Read classInd and the three train/test splits."""
    lists = list_dir(root)
    classes = read_classes(lists)
    index = {name: i for i, name in enumerate(classes)}
    splits = {}
    for k in SPLITS:
        splits[f"train_split{k}"] = _read_list(lists / f"trainlist0{k}.txt", index)
        splits[f"test_split{k}"] = _read_list(lists / f"testlist0{k}.txt", index)
    return UCF101Annotations(classes=classes, splits=splits)


def resolve(videos: Path, rel: str) -> Path:
    """The file on disk for a list entry; tolerates case differences between the lists and the
    disk."""
    path = videos / rel
    if path.exists():
        return path
    folder, name = rel.split("/", 1)
    for d in (videos / folder, *[p for p in videos.glob("*") if p.name.lower() == folder.lower()]):
        if d.is_dir():
            for f in d.iterdir():
                if f.name.lower() == name.lower():
                    return f
    return path  # missing: the runner records it as such


def listing(root: Path) -> Listing:
    """The release as the prepare stage needs it: ``<Class>/v_*.avi`` -> ``<Class>/v_*.mp4`` in six
    split lists."""
    ann = read_annotations(root)  # bad metadata stops the stage before anything is written
    videos = video_dir(root)
    resolved: dict[str, Path] = {}

    def entry(rel: str, label: int) -> Entry:
        if rel not in resolved:  # a video is listed in several splits: look it up on disk once
            resolved[rel] = resolve(videos, rel)
        stem = rel.rsplit(".", 1)[0]
        return Entry(stem, resolved[rel], stem + ".mp4", label)

    return Listing(ann.classes,
                   {s: [entry(r, y) for r, y in rows] for s, rows in ann.splits.items()})


def shard_splits(k: int) -> list[str]:
    if k not in SPLITS:
        raise ValueError(f"UCF101 has splits 1, 2 and 3, not {k}")
    return [f"train_split{k}", f"test_split{k}"]


def reference_files(csvs) -> dict[str, list[str]]:
    """TSTL's UCF101 loader (dataset/datasets.py) reads ``group1.csv`` (train) and
    ``val_group4.csv`` (val and test) from its ``--anno_path``: split 1, same lines as ours."""
    return {"group1.csv": list(csvs.get("train_split1", [])),
            "val_group4.csv": list(csvs.get("test_split1", []))}


DATASET = Dataset(
    name="ucf101", title="UCF101", root_var="UCF101_ROOT",
    root_help="folder with UCF-101/ and ucfTrainTestlist/",
    read=listing, id_problem=key_problem,
    splits=tuple(f"{kind}_split{k}" for k in SPLITS for kind in ("train", "test")),
    shard_splits=shard_splits, height=240, reference_files=reference_files)
