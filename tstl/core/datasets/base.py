"""What a dataset module describes, the metadata error, and the id safety rule every dataset shares.

A dataset is one module of ``tstl.core.datasets`` holding one ``Dataset``: how to read the release's official
metadata into a ``Listing`` (classes, labelled splits, unlabelled ids, where each video is), its id rule, which
annotation CSVs form the shard sets, its raw-root variable, its transcode defaults, and the extra annotation files
the reference code bases read. The offline stages (``pipeline``), the shard builder (``shard_tools``), both CLIs and
the Makefile iterate the registry; nothing else names a dataset.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path


class MetadataError(ValueError):
    """The release's annotation files are malformed; the message names the file and what to fix."""


def unsafe_id_reason(vid: str, max_slashes: int = 0) -> str | None:
    """Why ``vid`` cannot name a file under the dataset folder, or None if it can.

    The safety rule of every dataset: not empty, no control characters, no backslash, no ``.``/``..`` component,
    no leading ``/``, and at most ``max_slashes`` ``/`` (the dataset's own layout, e.g. ``<Class>/<file>``).
    """
    if not vid or not vid.strip():
        return "empty id"
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in vid):
        return "control character in id"
    if "\\" in vid:
        return "backslash in id"
    if vid.startswith("/"):
        return "absolute path"
    if any(part in ("", ".", "..") for part in vid.split("/")):
        return "'.', '..' or empty path component"
    if vid.count("/") > max_slashes:
        return f"path separator in id (at most {max_slashes} allowed)"
    return None


@dataclass(frozen=True)
class Entry:
    """One listed video: its manifest key, raw file, output path under ``<dataset>/videos``, label, and the
    segment to cut from an untrimmed source (seconds; None: the whole file)."""

    key: str
    source: Path
    output: str
    label: int = -1
    segment: tuple[float, float] | None = None


@dataclass
class Listing:
    """A release's metadata as the prepare stage needs it."""

    classes: list[str]                                                    # class name of label i
    splits: dict[str, list[Entry]]                                        # labelled: annotations/<split>.csv
    unlabelled: dict[str, list[Entry]] = field(default_factory=dict)      # ids in annotations/<split>_ids.txt


def _no_reference_files(csvs: Mapping[str, list[str]]) -> dict[str, list[str]]:
    return {}


@dataclass(frozen=True)
class Dataset:
    """Everything the stages, CLIs and Makefile need to know about one dataset.

    Attributes:
        name: folder name under ``DATA_DIR``, CLI/Make name (``prepare-<name>``) and ``configs/data/<name>.yaml``.
        title: human-readable name for help texts.
        root_var: the Make/environment variable holding the raw release folder (``SSV2_ROOT``).
        root_help: what that folder must contain.
        read: raw root -> ``Listing`` (raises ``MetadataError`` naming the file and the fix).
        id_problem: the dataset's id rule: why a key breaks it, or None.
        splits: the annotation split names ``read`` gives (labelled and unlabelled).
        shard_splits: ``--split k`` -> the annotation CSV stems that form the shard sets.
        height / short_side: transcode default, one of them set: a fixed output height, or the short side.
        max_missing_fraction: None: a listed video whose file is absent counts as a failure (it should be there);
            a number: absent files are normal for this release (Kinetics: YouTube removals), counted apart and
            allowed up to this fraction of the listed videos.
        reference_files: annotation CSV lines by split -> extra files (path under ``annotations/`` -> lines) for
            the reference code bases (CAST, TSTL), written by ``finalize``.
    """

    name: str
    title: str
    root_var: str
    root_help: str
    read: Callable[[Path], Listing]
    id_problem: Callable[[str], str | None]
    splits: tuple[str, ...]
    shard_splits: Callable[[int], list[str]]
    height: int | None = 240
    short_side: int | None = None
    max_missing_fraction: float | None = None
    reference_files: Callable[[Mapping[str, list[str]]], dict[str, list[str]]] = _no_reference_files

    @property
    def data_config(self) -> str:
        """The data layer of every recipe on this dataset (relative to the repository root)."""
        return f"configs/data/{self.name}.yaml"
