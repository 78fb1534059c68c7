"""What a dataset module describes, the metadata error, and the id safety rule every dataset shares.

A dataset is one module of ``tstl.core.datasets`` holding one ``Dataset``: how to read the release's
official metadata into a ``Listing`` (classes, labelled splits, unlabelled ids, where each video
is), its id rule, which annotation CSVs form the shard sets, its raw-root variable, its transcode
defaults, and the extra annotation files the reference code bases read. The offline stages
(``pipeline``), the shard builder (``shard_tools``), both CLIs and the Makefile iterate the
registry; nothing else names a dataset. The prepare stage holds every listing to its dataset's
description (``Dataset.check_listing``: split names, the id rule, the label heads) before it writes
anything.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


class MetadataError(ValueError):
    """The release's annotation files are malformed; the message names the file and what to fix."""


def unsafe_id_reason(vid: str, max_slashes: int = 0) -> str | None:
    """Why ``vid`` cannot name a file under the dataset folder, or None if it can.

    The safety rule of every dataset: not empty, no control characters, no backslash, no
    ``.``/``..`` component, no leading ``/``, and at most ``max_slashes`` ``/`` (the dataset's own
    layout, e.g. ``<Class>/<file>``).
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


Label = int | tuple[int, ...]
"""A video's label: one class, or one class per head (``Dataset.heads`` order) for a multi-head
dataset."""


@dataclass(frozen=True)
class Entry:
    """One listed video: its manifest key, raw file, output path under ``<dataset>/videos``, label,
    and the segment to cut from an untrimmed source (seconds; None: the whole file)."""

    key: str
    source: Path
    output: str
    label: Label = -1
    segment: tuple[float, float] | None = None


@dataclass
class Listing:
    """A release's metadata as the prepare stage needs it."""

    # name of label i (head 1)
    classes: list[str]
    # labelled: annotations/<split>.csv
    splits: dict[str, list[Entry]]
    # ids in annotations/<split>_ids.txt
    unlabelled: dict[str, list[Entry]] = field(default_factory=dict)
    heads: dict[str, list[str]] = field(default_factory=dict)
    """Multi-head datasets: class names of each head (``annotations/<head>_classes.txt``); empty for
    one label."""


class CsvFormat(Protocol):
    """How a dataset's annotation CSV lines look (``annotations/<split>.csv``,
    ``listed_<split>.csv``)."""

    def line(self, output: str, label: Label) -> str:
        """The line of a video at ``output`` (relative to ``videos/``) with ``label``."""
        ...

    def parse(self, line: str) -> tuple[str, Label]:
        """``(output, label)`` of a line; ``ValueError`` saying what the line should look like."""
        ...


class SpaceCsv:
    """``<video path> <label>``: CAST's and VideoMAE's SSV2/Kinetics format (one space, no
    header)."""

    def line(self, output: str, label: Label) -> str:
        return f"{output} {label}"

    def parse(self, line: str) -> tuple[str, Label]:
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError("not '<video path> <integer label>'")
        return parts[0], int(parts[1])


SPACE_CSV = SpaceCsv()


def _no_reference_files(csvs: Mapping[str, list[str]]) -> dict[str, list[str]]:
    return {}


@dataclass(frozen=True)
class Dataset:
    """Everything the stages, CLIs and Makefile need to know about one dataset.

    Attributes:
        name: folder name under ``DATA_DIR``, CLI/Make name (``prepare-<name>``) and
            ``configs/data/<name>.yaml``.
        title: human-readable name for help texts.
        root_var: the Make/environment variable holding the raw release folder (``SSV2_ROOT``).
        root_help: what that folder must contain.
        read: raw root -> ``Listing`` (raises ``MetadataError`` naming the file and the fix).
        id_problem: the dataset's id rule: why a key breaks it, or None.
        splits: the annotation split names ``read`` gives (labelled and unlabelled).
        shard_splits: ``--split k`` -> the annotation CSV stems that form the shard sets.
        height / short_side: transcode default, one of them set: a fixed output height, or the short
            side.
        max_missing_fraction: None: a listed video whose file is absent counts as a failure (it
            should be there); a number: absent files are normal for this release (Kinetics: YouTube
            removals), counted apart and allowed up to this fraction of the listed videos.
        reference_files: annotation CSV lines by split -> extra files (path under ``annotations/``
            -> lines) for the reference code bases (CAST, TSTL), written by ``finalize``.
        heads: names of the label heads of a multi-head dataset (EPIC-KITCHENS: verb, noun), the
            first one being the class the shard samples' ``cls`` holds; empty: one label per video.
        csv_format: the line format of the annotation CSVs (default ``<path> <label>``).
        clips_per_source: the release cuts many listed clips from each long source video: the
            prepare stage decodes a source once for all its clips and assigns ``--part`` shares by
            source.
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
    heads: tuple[str, ...] = ()
    csv_format: CsvFormat = SPACE_CSV
    clips_per_source: bool = False

    @property
    def data_config(self) -> str:
        """The data layer of every recipe on this dataset (relative to the repository root)."""
        return f"configs/data/{self.name}.yaml"

    def check_listing(self, listing: Listing) -> None:
        """Hold ``read``'s listing to this description (split names, id rule, heads);
        ``MetadataError`` names the first entry that breaks it, before the stage writes anything."""
        for kind, groups in (("labelled", listing.splits), ("unlabelled", listing.unlabelled)):
            for split in groups:
                if split not in self.splits:
                    raise MetadataError(f"{self.name}: the release gave a {kind} split '{split}', "
                                        f"not one of this dataset's ({', '.join(self.splits)})")
        if tuple(listing.heads) != self.heads:
            raise MetadataError(f"{self.name}: the release gave the label heads "
                                f"{list(listing.heads)}, this dataset has {list(self.heads)}")
        sizes = [len(names) for names in listing.heads.values()] or [len(listing.classes)]
        heads = dict(zip(self.heads or ("label",), sizes))
        for split, rows in {**listing.splits, **listing.unlabelled}.items():
            for e in rows:
                reason = self.id_problem(e.key)
                if reason:
                    raise MetadataError(f"{self.name} {split}: id {e.key!r} breaks the id rule "
                                        f"({reason}); fix or remove it in the release's files")
                if split in listing.splits and not _label_fits(e.label, sizes):
                    raise MetadataError(f"{self.name} {split}: {e.key}: label {e.label} is not one "
                                        f"class of each head ({heads} classes)")


def _label_fits(label: Label, sizes: list[int]) -> bool:
    labels = label if isinstance(label, tuple) else (label,)
    return len(labels) == len(sizes) and all(0 <= y < n for y, n in zip(labels, sizes))
