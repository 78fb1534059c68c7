"""Shard sources and the per-epoch assignment of samples to (rank, worker) slots.

A source is a shard-set directory, the path or URL of its ``shards.json``, a brace pattern, a ``pipe:`` command,
an http(s) URL, or a list of these. ``shards.json`` gives every shard's sample count, which the balancing needs;
without it the shards are scanned once to count samples. The format is ``tstl.core.shards``'; a local set's
symlink is resolved once, so a run reads one generation even when ``make shards`` switches the set meanwhile.
"""

from __future__ import annotations

import logging
import math
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import braceexpand
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from tstl.core import shards as fmt
from tstl.core.shards import CLS, ShardSetError
from tstl.data.plan import slot_ranges

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """One tar shard: where to read it and how many samples it holds."""

    name: str
    url: str
    samples: int


@dataclass(frozen=True)
class Piece:
    """Samples ``[skip, skip + take)`` of one shard, in tar order."""

    shard: Shard
    skip: int
    take: int


@dataclass
class ShardList:
    """The loader's view of a source: an ordered list of shards with optional class metadata from ``shards.json``
    (the format's own description is ``tstl.core.shards.ShardSet``)."""

    shards: list[Shard]
    classes: list[str] | None = None
    num_classes: int | None = None
    labels: frozenset[int] | None = None
    """When set, only samples with these labels exist for the loader (shard counts are already filtered)."""

    @property
    def num_samples(self) -> int:
        """Samples in all shards."""
        return sum(s.samples for s in self.shards)


def iter_tar(url: str) -> Iterator[dict]:
    """Samples of one tar (``{"__key__": str, ext: bytes, ...}``) in order; members are grouped by key.

    The stream is closed when the generator is closed, so an early stop leaves no open file (no ResourceWarning).
    """
    with wds.gopen(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        sample: dict = {}
        for member in tar:
            if not member.isfile():
                continue
            split = base_plus_ext(member.name)
            if split is None:
                continue
            key, ext = split
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            sample["__key__"] = key
            sample[ext.lower()] = tar.extractfile(member).read()
        if sample:
            yield sample


def label_of(sample: dict) -> int | None:
    """The sample's integer label, or None if its ``cls`` part is missing or malformed."""
    try:
        return int(sample[CLS])
    except (KeyError, ValueError):
        return None


def keep(sample: dict, labels: frozenset[int] | None) -> bool:
    """Whether a raw sample belongs to the (possibly label-filtered) shard set."""
    return labels is None or label_of(sample) in labels


def _count(url: str, labels: frozenset[int] | None) -> int:
    return sum(1 for s in iter_tar(url) if keep(s, labels))


def _filtered_counts(json_url: str, shards: list[Shard], labels: frozenset[int]) -> list[int]:
    """Per-shard sample counts of ``labels``: from ``manifest.parquet``'s class histograms, else by scanning."""
    manifest = Path(fmt.sibling(json_url, fmt.MANIFEST))
    if fmt.is_local(json_url) and manifest.is_file():
        hist = {name: info.class_hist for name, info in fmt.read_manifest(manifest).items()}
        if all(s.name in hist for s in shards):
            return [sum(hist[s.name].get(k, 0) for k in labels) for s in shards]
    logger.warning("no local %s next to %s: scanning shards to count the selected labels", fmt.MANIFEST, json_url)
    return [_count(s.url, labels) for s in shards]


def _check_size(shard: Shard, expected: int, json_url: str) -> None:
    """Refuse a local shard whose size is not the one ``shards.json`` gives (a half-copied or stale tar)."""
    if expected < 0 or not fmt.is_local(shard.url):
        return
    try:
        size = os.stat(shard.url).st_size
    except OSError as e:
        raise ShardSetError(f"{shard.url}: listed in {json_url} but cannot be read ({e.strerror}); "
                            "rebuild the set with `make shards`") from e
    if size != expected:
        raise ShardSetError(f"{shard.url}: {size} bytes, {json_url} says {expected}; the shard and its shard list "
                            "disagree (half-copied or stale): rebuild the set with `make shards`")


def _from_json(url: str, template: str, labels: frozenset[int] | None) -> ShardList:
    meta = fmt.read_index(url)
    shards = [
        Shard(s.name, template.format(name=s.name) if template else fmt.sibling(url, s.name), s.samples)
        for s in meta.shards
    ]
    if not shards:
        raise ValueError(f"{url}: lists no shards")
    for shard, info in zip(shards, meta.shards):
        _check_size(shard, info.bytes, url)
    if labels is not None:
        counts = _filtered_counts(url, shards, labels)
        shards = [Shard(s.name, s.url, n) for s, n in zip(shards, counts) if n]
        if not shards:
            raise ValueError(f"{url}: no samples with labels {sorted(labels)}")
    return ShardList(shards, meta.classes or None, meta.num_classes or None, labels)


def resolve(source: str | os.PathLike | Sequence[str], template: str = "",
            labels: Sequence[int] = ()) -> ShardList:
    """Turn a source into a ``ShardList`` with per-shard sample counts.

    Args:
        source: shard-set directory, ``shards.json`` path/URL, brace pattern / URL / ``pipe:`` command, or a list.
        template: optional ``str.format`` template with ``{name}`` used instead of the ``shards.json`` location.
        labels: keep only samples with these labels (empty: all).
    """
    wanted = frozenset(labels) if labels else None
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if Path(text).is_dir():
            return _from_json(str(Path(text).resolve() / fmt.INDEX), template, wanted)
        if text.endswith(fmt.INDEX):
            return _from_json(str(Path(text).resolve()) if fmt.is_local(text) else text, template, wanted)
        urls = list(braceexpand.braceexpand(text))
    else:
        urls = [u for s in source for u in braceexpand.braceexpand(os.fspath(s))]
    logger.warning("no shards.json given: scanning %d shard(s) once to count samples", len(urls))
    shards = [Shard(u.rstrip("/").rsplit("/", 1)[-1], u, _count(u, wanted)) for u in urls]
    return ShardList([s for s in shards if s.samples], labels=wanted)


def slot_length(num_samples: int, slots: int, multiple: int, drop: bool) -> int:
    """Samples per (rank, worker) slot: equal for all, a multiple of ``multiple``.

    ``drop`` rounds down (up to ``slots * multiple - 1`` samples left out of the epoch); otherwise it rounds up
    and the extra samples are repeats taken from the start of the epoch's order.
    """
    unit = slots * multiple
    n = num_samples // unit if drop else math.ceil(num_samples / unit)
    if n == 0:
        raise ValueError(
            f"{num_samples} samples cannot fill one batch of {multiple} on each of {slots} rank x worker slots; "
            "lower batch_size or num_workers, or set balance=pad")
    return n * multiple


def epoch_order(shards: list[Shard], seed: int | None) -> list[Shard]:
    """The shard order of an epoch: a seeded permutation in training, the listed order otherwise."""
    order = list(shards)
    if seed is not None:
        random.Random(seed).shuffle(order)
    return order


def slot_pieces(order: list[Shard], slot: int, length: int, plan: Sequence[tuple[int, int]] | None = None
                ) -> list[Piece]:
    """The pieces covering positions ``[slot * length, (slot + 1) * length)`` of the epoch's sample sequence.

    The sequence is the shards' samples in ``order`` (sample index ``i`` = the ``i``-th sample of that order), or,
    with ``plan``, only the sample indices of its ``[start, stop)`` ranges (an elastic resume's remainder of the
    epoch, ``tstl.data.elastic``). It repeats cyclically, so positions past its end wrap to its start (that is the
    padding rule).
    """
    total = sum(s.samples for s in order)
    return [piece for start, stop in slot_ranges(total, slot, length, plan)
            for piece in _index_pieces(order, start, stop)]


def _index_pieces(order: list[Shard], start: int, stop: int) -> list[Piece]:
    """The pieces holding sample indices ``[start, stop)`` of ``order`` (within one pass over it)."""
    pieces: list[Piece] = []
    base = 0
    for shard in order:
        lo, hi = max(start, base), min(stop, base + shard.samples)
        if lo < hi:
            pieces.append(Piece(shard, lo - base, hi - lo))
        base += shard.samples
        if base >= stop:
            break
    return pieces
