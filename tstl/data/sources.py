"""Shard sources and the per-epoch assignment of samples to (rank, worker) slots.

A source is a shard-set directory (local, or an http(s) URL of the folder), the path or URL of its ``shards.json``,
a brace pattern, a ``pipe:`` command, an http(s) URL of a tar, or a list of these. ``shards.json`` gives every
shard's sample count, which the balancing needs; without it the shards are scanned once to count samples. The
format is ``tstl.core.shards``'; a local set's symlink is resolved once, so a run reads one generation even when
``make shards`` switches the set meanwhile.

Remote reads (``pipe:`` commands, http(s) URLs) go through ``open_shard``: a read that gets no byte for
``timeout_s`` fails (the ``pipe:`` process group is killed), and ``_read`` in ``pipeline.py`` retries a shard a
bounded number of times before counting its remaining samples as bad.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import math
import os
import random
import select
import signal
import subprocess
import tarfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

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
    heads: dict[str, list[str]] | None = None
    """Multi-head sets: class names per head (``shards.json`` ``heads``); None for one label."""

    @property
    def head_sizes(self) -> dict[str, int] | None:
        """Classes per head of a multi-head set; None for one label."""
        return {h: len(names) for h, names in self.heads.items()} if self.heads else None

    @property
    def num_samples(self) -> int:
        """Samples in all shards."""
        return sum(s.samples for s in self.shards)


READ_ERRORS = (OSError, tarfile.TarError, ValueError, http.client.HTTPException)
"""What a failed shard read raises (TimeoutError and urllib's errors are OSErrors)."""

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_RETRIES = 2


def retry_pause(attempt: int) -> None:
    """The pause before retry ``attempt`` (1, 2, ...) of a remote read: a transient fault gets a moment to clear."""
    time.sleep(min(0.5 * attempt, 5.0))


def is_remote(url: str) -> bool:
    """Whether ``url`` is read through the network or a command (``pipe:``, http(s)): those get a timeout."""
    return url.startswith(("pipe:", "http://", "https://"))


class _PipeStream(io.RawIOBase):
    """stdout of a ``pipe:`` command in its own process group; a read waits at most ``timeout_s`` for data.

    On a stall, an error or ``close()`` before the end, the whole process group is killed (``sh -c '...; sleep'``
    leaves no ``sleep`` behind), so a hung source costs ``timeout_s``, not the run.
    """

    def __init__(self, url: str, timeout_s: float) -> None:
        super().__init__()
        self.url, self.timeout_s = url, timeout_s
        self.proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, start_new_session=True)
        self.fd = self.proc.stdout.fileno()
        self.eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        if self.eof:
            return 0
        if self.timeout_s > 0 and not select.select([self.fd], [], [], self.timeout_s)[0]:
            self._kill()
            raise TimeoutError(f"{self.url}: no data for {self.timeout_s:g} s (data.read_timeout_s)")
        data = os.read(self.fd, len(buf))
        if not data:
            self.eof = True
            try:
                rc = self.proc.wait(timeout=self.timeout_s or None)
            except subprocess.TimeoutExpired as e:
                self._kill()
                raise TimeoutError(f"{self.url}: closed its output but did not exit within {self.timeout_s:g} s") from e
            if rc:
                raise OSError(f"{self.url}: exited with status {rc}")
            return 0
        buf[:len(data)] = data
        return len(data)

    def _kill(self) -> None:
        # The whole group: also the children of a shell that already exited (the group outlives its leader).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if not self.closed:
            self._kill()
            self.proc.stdout.close()
        super().close()


def open_shard(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> IO[bytes]:
    """A binary stream of a shard (or ``shards.json``/manifest): a local path, ``pipe:`` command or http(s) URL
    (both with a stall timeout of ``timeout_s``, 0 = none), anything else through ``webdataset.gopen``."""
    if url.startswith("pipe:"):
        return io.BufferedReader(_PipeStream(url, timeout_s), buffer_size=1 << 20)
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=timeout_s or None)  # http(s) only: checked above
    if fmt.is_local(url):
        return open(url, "rb")
    return wds.gopen(url)


def read_bytes(url: str, timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES) -> bytes:
    """The whole content at ``url`` (small files: ``shards.json``, the manifest), retried like shards."""
    for attempt in range(retries + 1):
        try:
            with open_shard(url, timeout_s) as f:
                return f.read()
        except READ_ERRORS as e:
            if attempt == retries or not is_remote(url):
                raise OSError(f"{url}: cannot be read ({type(e).__name__}: {e})") from e
            logger.warning("%s: read failed (%s), retrying (%d of %d)", url, e, attempt + 1, retries)
            retry_pause(attempt + 1)
    raise AssertionError("unreachable")


def iter_tar(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[dict]:
    """Samples of one tar (``{"__key__": str, ext: bytes, ...}``) in order; members are grouped by key.

    The stream is closed when the generator is closed, so an early stop leaves no open file (no ResourceWarning)
    and no ``pipe:`` process. Remote reads fail with ``TimeoutError`` after ``timeout_s`` without data.
    """
    with open_shard(url, timeout_s) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
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


@dataclass(frozen=True)
class ReadPolicy:
    """Timeout (seconds without data) and retries of remote reads (``DataConfig.read_timeout_s/read_retries``)."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    retries: int = DEFAULT_RETRIES


def _count(url: str, labels: frozenset[int] | None, policy: ReadPolicy = ReadPolicy()) -> int:
    for attempt in range(policy.retries + 1):
        try:
            return sum(1 for s in iter_tar(url, policy.timeout_s) if keep(s, labels))
        except READ_ERRORS as e:
            if attempt == policy.retries or not is_remote(url):
                raise OSError(f"{url}: cannot be scanned to count its samples ({type(e).__name__}: {e})") from e
            logger.warning("%s: read failed (%s), retrying (%d of %d)", url, e, attempt + 1, policy.retries)
            retry_pause(attempt + 1)
    raise AssertionError("unreachable")


def _manifest_hist(url: str, policy: ReadPolicy) -> dict[str, dict[int, int]] | None:
    """Class histograms per shard from the ``manifest.parquet`` at ``url`` (local or remote); None when it cannot
    be read."""
    try:
        if fmt.is_local(url):
            if not Path(url).is_file():
                return None
            rows = fmt.read_manifest(url)
        else:
            rows = fmt.read_manifest(io.BytesIO(read_bytes(url, policy.timeout_s, policy.retries)))
    except Exception as e:
        logger.warning("%s: not readable (%s: %s)", url, type(e).__name__, e)
        return None
    return {name: info.class_hist for name, info in rows.items()}


def _filtered_counts(manifest_url: str, shards: list[Shard], labels: frozenset[int],
                     policy: ReadPolicy = ReadPolicy()) -> list[int]:
    """Per-shard sample counts of ``labels``: from ``manifest.parquet``'s class histograms (local, http or
    ``pipe:``), else by scanning."""
    hist = _manifest_hist(manifest_url, policy)
    if hist is not None and all(s.name in hist for s in shards):
        return [sum(hist[s.name].get(k, 0) for k in labels) for s in shards]
    logger.warning("no readable %s: scanning shards to count the selected labels", manifest_url)
    return [_count(s.url, labels, policy) for s in shards]


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


def shard_url(template: str, name: str, dataset: str = "", split: str = "") -> str:
    """``template`` with ``{name}`` (a file of the set: a shard, ``shards.json``, ``manifest.parquet``) and the
    optional ``{dataset}``/``{split}`` filled in, so one template serves every split."""
    try:
        return template.format(name=name, dataset=dataset, split=split)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"data.shard_url_template {template!r}: only {{name}}, {{dataset}} and {{split}} can be "
                         f"used ({type(e).__name__}: {e})") from None


def _read_index(url: str, policy: ReadPolicy) -> fmt.ShardSet:
    if fmt.is_local(url):
        return fmt.read_index(url)
    try:
        data = read_bytes(url, policy.timeout_s, policy.retries)
    except OSError as e:
        raise FileNotFoundError(f"{url}: cannot read the shard list ({e}); run `make shards` or fix the "
                                "data_dir / data.shard_url_template") from e
    return fmt.parse_index(data, url)


def _from_json(url: str, template: str, labels: frozenset[int] | None, policy: ReadPolicy = ReadPolicy(),
               names: tuple[str, str] | None = None) -> ShardList:
    """``names``: the (dataset, split) that ``{dataset}``/``{split}`` of the template stand for (default: those
    ``shards.json`` gives)."""
    meta = _read_index(url, policy)
    dataset, split = names or (meta.dataset, meta.split)
    shards = [
        Shard(s.name, shard_url(template, s.name, dataset, split) if template else fmt.sibling(url, s.name),
              s.samples)
        for s in meta.shards
    ]
    if not shards:
        raise ValueError(f"{url}: lists no shards")
    for shard, info in zip(shards, meta.shards):
        _check_size(shard, info.bytes, url)
    if labels is not None:
        manifest = (shard_url(template, fmt.MANIFEST, dataset, split) if template and not fmt.is_local(url)
                    else fmt.sibling(url, fmt.MANIFEST))
        counts = _filtered_counts(manifest, shards, labels, policy)
        shards = [Shard(s.name, s.url, n) for s, n in zip(shards, counts) if n]
        if not shards:
            raise ValueError(f"{url}: no samples with labels {sorted(labels)}")
    return ShardList(shards, meta.classes or None, meta.num_classes or None, labels,
                     meta.heads or None)


_TAR = (".tar", ".tgz", ".tar.gz")


def _is_set_url(text: str) -> bool:
    """An http(s) URL of a shard-set folder (not of one tar, not a brace pattern)."""
    last = text.rstrip("/").rsplit("/", 1)[-1]
    return text.startswith(("http://", "https://")) and "{" not in text and not last.endswith((*_TAR, ".json"))


def _index_of(text: str, template: str) -> tuple[str, tuple[str, str] | None] | None:
    """Where the ``shards.json`` of a source is, with the (dataset, split) names a template needs; None for a
    source without one (a brace pattern, a tar, a ``pipe:`` command)."""
    path = Path(text)
    if path.is_dir() and ((path / fmt.INDEX).exists() or not template):
        return str(path.resolve() / fmt.INDEX), None
    if text.endswith(fmt.INDEX):
        return (str(path.resolve()) if fmt.is_local(text) else text), None
    if _is_set_url(text):
        return f"{text.rstrip('/')}/{fmt.INDEX}", None
    if template and fmt.is_local(text) and not any(c in text for c in "{*?") and not text.endswith(_TAR):
        # the trainer's <data_dir>/<dataset>/shards/<split>, not present here: the list comes from the template
        names = (path.parent.parent.name, path.name)
        return shard_url(template, fmt.INDEX, *names), names
    return None


def has_index(source: str | os.PathLike | Sequence[str], template: str = "") -> bool:
    """Whether ``resolve(source, template)`` reads a ``shards.json`` (cheap) rather than scanning shards."""
    return isinstance(source, (str, os.PathLike)) and _index_of(os.fspath(source), template) is not None


def resolve(source: str | os.PathLike | Sequence[str], template: str = "",
            labels: Sequence[int] = (), *, read_timeout_s: float = DEFAULT_TIMEOUT_S,
            read_retries: int = DEFAULT_RETRIES) -> ShardList:
    """Turn a source into a ``ShardList`` with per-shard sample counts.

    Args:
        source: shard-set directory (local path or http(s) URL of the folder), ``shards.json`` path/URL, brace
            pattern / URL / ``pipe:`` command, or a list.
        template: optional ``str.format`` template with ``{name}`` (and optionally ``{dataset}``, ``{split}``)
            used instead of the ``shards.json`` location. When ``source`` is a local path
            ``.../<dataset>/shards/<split>`` without a ``shards.json``, the list itself is read from
            ``template`` with ``name="shards.json"`` (nothing local but the config).
        labels: keep only samples with these labels (empty: all).
        read_timeout_s, read_retries: remote reads (``shards.json``, manifest, scans) give up after this many
            seconds without data, and are retried this many times.
    """
    wanted = frozenset(labels) if labels else None
    policy = ReadPolicy(read_timeout_s, read_retries)
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        index = _index_of(text, template)
        if index is not None:
            return _from_json(index[0], template, wanted, policy, index[1])
        urls = list(braceexpand.braceexpand(text))
    else:
        urls = [u for s in source for u in braceexpand.braceexpand(os.fspath(s))]
    logger.warning("no shards.json given: scanning %d shard(s) once to count samples", len(urls))
    shards = [Shard(u.rstrip("/").rsplit("/", 1)[-1], u, _count(u, wanted, policy)) for u in urls]
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
