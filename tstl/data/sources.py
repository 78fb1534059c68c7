"""Source resolution: a shard-set folder, URL, pattern or list -> a ``ShardList`` with its
per-sample index.

A source is a shard-set directory (local, or an http(s) URL of the folder), the path or URL of its
``shards.json``, a brace pattern, a ``pipe:`` command, an http(s) URL of a tar, or a list of these.
``shards.json`` gives the shards and classes, and names the set's per-sample index
(``samples.parquet``, ``tstl.core.shards``), from which the loader reads each sample by byte range.
A set built before the index existed is indexed here from its tar headers (local: seconds; remote:
one full read), with one warning naming ``tstl shards index``, which saves that work. A local set's
symlink is resolved once, so a run reads one generation even when ``make shards`` switches the set.
"""

from __future__ import annotations

import hashlib
import logging
import os
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
import numpy as np

from tstl.core import shards as fmt
from tstl.core.shards import SampleIndex, ShardSetError
from tstl.core.transport import (
    DEFAULT_POLICY,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT_S,
    RANGE_FIELDS,
    READ_ERRORS,
    ReadPolicy,
    open_stream,
    read_bytes,
    retrying,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """One tar shard: where to read it and how many samples it holds."""

    name: str
    url: str
    samples: int


@dataclass
class ShardList:
    """The loader's view of a source: its shards, the per-sample index, the samples it keeps (a
    label filter) and the class metadata of ``shards.json`` (the format's own description is
    ``tstl.core.shards.ShardSet``)."""

    shards: list[Shard]
    index: SampleIndex
    rows: np.ndarray
    """Index rows (sorted) of the samples the loader sees: all, or those of ``labels``."""
    classes: list[str] | None = None
    num_classes: int | None = None
    labels: frozenset[int] | None = None
    """When set, only samples with these labels exist for the loader."""
    fingerprint: str = ""
    """Identifies the set's content (sha256 of its ``shards.json``, else of its scanned index)."""
    origin: str = ""
    """Where ``shards.json`` was read (re-read to notice a set replaced during a run); empty without
    one."""
    heads: dict[str, list[str]] | None = field(default=None)
    """Multi-head sets (``shards.json`` ``heads``): head name -> class names."""

    @property
    def head_sizes(self) -> dict[str, int] | None:
        """Classes per head of a multi-head set; None for one label."""
        return {h: len(names) for h, names in self.heads.items()} if self.heads else None

    @property
    def num_samples(self) -> int:
        """Samples the loader sees."""
        return len(self.rows)

    def url(self, row: int) -> str:
        return self.shards[int(self.index.shard[row])].url

    def remote(self) -> bool:
        """Whether any shard is read through the network or a command."""
        return any(not fmt.is_local(s.url) for s in self.shards)


class _KeepRange(dict):
    def __missing__(self, key: str) -> str:
        if f"{{{key}}}" in RANGE_FIELDS:
            return f"{{{key}}}"  # filled per read (tstl.core.transport.range_command)
        raise KeyError(key)


def shard_url(template: str, name: str, dataset: str = "", split: str = "") -> str:
    """``template`` with ``{name}`` (a file of the set: a shard, ``shards.json``, the index) and the
    optional ``{dataset}``/``{split}`` filled in; the range fields ``{offset}``, ``{length}``,
    ``{last}`` stay for the reader."""
    try:
        return string.Formatter().vformat(template, (),
                                          _KeepRange(name=name, dataset=dataset, split=split))
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"data.shard_url_template {template!r}: only {{name}}, {{dataset}}, "
                         f"{{split}} and the range fields {', '.join(RANGE_FIELDS)} can be used "
                         f"({type(e).__name__}: {e})") from None


def _strip_range(url: str) -> str:
    """A template URL for reading a whole file (``shards.json``, the index): range fields are not
    allowed there, so a ranged command is for shards only."""
    if any(f in url for f in RANGE_FIELDS):
        raise ValueError(f"{url}: a command with {'/'.join(RANGE_FIELDS)} reads byte ranges of "
                         "shards; shards.json and samples.parquet are read whole: give data_dir a "
                         "local or http shard list, or a template without range fields for them")
    return url


def _check_size(shard: Shard, expected: int, json_url: str) -> None:
    """Refuse a local shard whose size is not the one ``shards.json`` gives (a half-copied or stale
    tar)."""
    if expected < 0 or not fmt.is_local(shard.url):
        return
    try:
        size = os.stat(shard.url).st_size
    except OSError as e:
        raise ShardSetError(f"{shard.url}: listed in {json_url} but cannot be read ({e.strerror}); "
                            "rebuild the set with `make shards`") from e
    if size != expected:
        raise ShardSetError(f"{shard.url}: {size} bytes, {json_url} says {expected}; the shard and "
                            "its shard list disagree (half-copied or stale): rebuild the set with "
                            "`make shards`")


# ---- the index of a set without samples.parquet --------------------------------------------------

def scan_shards(urls: Sequence[str], policy: ReadPolicy = DEFAULT_POLICY) -> SampleIndex:
    """Index shards from their tar headers: local files by seeking, remote ones by reading them
    through once."""
    per_shard = []
    for url in urls:
        def once(_attempt: int, url: str = url) -> list[tuple[str, int, int, int]]:
            with open_stream(url, policy.timeout_s) as f:
                return fmt.scan_tar(f, stream=not fmt.is_local(url))

        try:
            per_shard.append(retrying(url, policy, "scan", once))
        except READ_ERRORS as e:
            raise OSError(f"{url}: cannot be scanned to index its samples "
                          f"({type(e).__name__}: {e})") from e
    return fmt.index_from_rows(per_shard)


_WARNED: set[str] = set()


def _warn_once(where: str, message: str, *args: object) -> None:
    if where not in _WARNED:
        _WARNED.add(where)
        logger.warning(message, *args)


def _index(ss: fmt.ShardSet, json_url: str, shards: list[Shard], samples_url: str,
           policy: ReadPolicy) -> SampleIndex:
    """The set's per-sample index: ``samples.parquet`` when ``shards.json`` names one, else a
    scan."""
    if ss.samples is not None:
        return fmt.parse_samples(read_bytes(samples_url, policy), ss, samples_url)
    if fmt.is_local(json_url):
        _warn_once(json_url, "%s has no %s: indexing its %d shards from their tar headers; "
                   "`tstl shards index %s` saves this for every later run", json_url, fmt.SAMPLES,
                   len(shards), Path(json_url).parent)
    else:
        _warn_once(json_url, "%s has no %s: reading all %d shards once to index them; run "
                   "`tstl shards index <set> --out DIR` and publish DIR/%s (and the new %s) beside "
                   "it to skip this", json_url, fmt.SAMPLES, len(shards), fmt.SAMPLES, fmt.INDEX)
    index = scan_shards([s.url for s in shards], policy)
    counts = index.counts(len(shards))
    bad = [(s.name, n, s.samples) for s, n in zip(shards, counts) if n != s.samples]
    if bad:
        name, n, want = bad[0]
        raise ShardSetError(f"{json_url}: shard {name} holds {n} samples, the list says {want}; "
                            "rebuild the set with `make shards`")
    return index


def _from_json(url: str, template: str, policy: ReadPolicy, names: tuple[str, str] | None = None
               ) -> tuple[fmt.ShardSet, list[Shard], SampleIndex, str]:
    """``names``: the (dataset, split) that ``{dataset}``/``{split}`` of the template stand for
    (default: those ``shards.json`` gives)."""
    try:
        data = (read_bytes(_strip_range(url), policy) if not fmt.is_local(url)
                else Path(url).read_bytes())
    except OSError as e:
        raise FileNotFoundError(f"{url}: cannot read the shard list ({e}); run `make shards` or "
                                "fix the data_dir / data.shard_url_template") from e
    ss = fmt.parse_index(data, url)
    dataset, split = names or (ss.dataset, ss.split)

    def where(name: str) -> str:
        return shard_url(template, name, dataset, split) if template else fmt.sibling(url, name)

    shards = [Shard(s.name, where(s.name), s.samples) for s in ss.shards]
    if not shards:
        raise ValueError(f"{url}: lists no shards")
    for shard, info in zip(shards, ss.shards):
        _check_size(shard, info.bytes, url)
    samples_name = (ss.samples or {}).get("name", fmt.SAMPLES)
    samples_url = (fmt.sibling(url, samples_name) if fmt.is_local(url) or not template
                   else _strip_range(where(samples_name)))
    index = _index(ss, url, shards, samples_url, policy)
    return ss, shards, index, hashlib.sha256(data).hexdigest()


_TAR = (".tar", ".tgz", ".tar.gz")


def _is_set_url(text: str) -> bool:
    """An http(s) URL of a shard-set folder (not of one tar, not a brace pattern)."""
    last = text.rstrip("/").rsplit("/", 1)[-1]
    return (text.startswith(("http://", "https://")) and "{" not in text
            and not last.endswith((*_TAR, ".json")))


def _index_of(text: str, template: str) -> tuple[str, tuple[str, str] | None] | None:
    """Where the ``shards.json`` of a source is, with the (dataset, split) names a template needs;
    None for a source without one (a brace pattern, a tar, a ``pipe:`` command)."""
    path = Path(text)
    if path.is_dir() and ((path / fmt.INDEX).exists() or not template):
        return str(path.resolve() / fmt.INDEX), None
    if text.endswith(fmt.INDEX):
        return (str(path.resolve()) if fmt.is_local(text) else text), None
    if _is_set_url(text):
        return f"{text.rstrip('/')}/{fmt.INDEX}", None
    if (template and fmt.is_local(text) and not any(c in text for c in "{*?")
            and not text.endswith(_TAR)):
        # the trainer's <data_dir>/<dataset>/shards/<split>, not present here: the list comes from
        # the template
        names = (path.parent.parent.name, path.name)
        return shard_url(template, fmt.INDEX, *names), names
    return None


def resolve(source: str | os.PathLike | Sequence[str], template: str = "",
            labels: Sequence[int] = (), *, read_timeout_s: float = DEFAULT_TIMEOUT_S,
            read_retries: int = DEFAULT_RETRIES) -> ShardList:
    """Turn a source into a ``ShardList`` with its per-sample index.

    Args:
        source: shard-set directory (local path or http(s) URL of the folder), ``shards.json``
            path/URL, brace pattern / URL / ``pipe:`` command, or a list.
        template: optional ``str.format`` template with ``{name}`` (and optionally ``{dataset}``,
            ``{split}``, and the range fields ``{offset}``/``{length}``/``{last}`` for ranged
            ``pipe:`` reads) used instead of the ``shards.json`` location. When ``source`` is a
            local path ``.../<dataset>/shards/<split>`` without a ``shards.json``, the list itself
            is read from ``template`` with ``name="shards.json"``.
        labels: keep only samples with these labels (empty: all); selected through the index,
            nothing is read.
        read_timeout_s, read_retries: remote reads give up after this many seconds without data, and
            are retried this many times.
    """
    wanted = frozenset(int(x) for x in labels) if labels else None
    policy = ReadPolicy(read_timeout_s, read_retries)
    meta: fmt.ShardSet | None = None
    origin = ""
    if isinstance(source, (str, os.PathLike)) and (found := _index_of(os.fspath(source), template)):
        meta, shards, index, fingerprint = _from_json(found[0], template, policy, found[1])
        origin = found[0]
    else:
        texts = ([os.fspath(source)] if isinstance(source, (str, os.PathLike))
                 else [os.fspath(s) for s in source])
        urls = [u for t in texts for u in braceexpand.braceexpand(t)]
        logger.warning("no shards.json given: scanning %d shard(s) once to index their samples",
                       len(urls))
        index = scan_shards(urls, policy)
        counts = index.counts(len(urls))
        shards = [Shard(u.rstrip("/").rsplit("/", 1)[-1], u, n) for u, n in zip(urls, counts)]
        fingerprint = hashlib.sha256("\n".join(urls).encode() + index.offset.tobytes()).hexdigest()
    rows = np.arange(len(index), dtype=np.int64)
    if wanted is not None:
        rows = np.flatnonzero(np.isin(index.label, sorted(wanted))).astype(np.int64)
        if not len(rows):
            raise ValueError(f"{source}: no samples with labels {sorted(wanted)}")
    elif not len(rows):
        raise ValueError(f"{source}: holds no samples")
    classes = (meta.classes or None) if meta else None
    return ShardList(shards, index, rows, classes, len(classes) if classes else None, wanted,
                     fingerprint, origin, (meta.heads or None) if meta else None)


def has_index(source: str | os.PathLike | Sequence[str], template: str = "") -> bool:
    """Whether ``resolve(source, template)`` reads a ``shards.json`` (cheap) rather than scanning
    shards."""
    return (isinstance(source, (str, os.PathLike))
            and _index_of(os.fspath(source), template) is not None)


def changed(shardset: ShardList, policy: ReadPolicy = DEFAULT_POLICY) -> str | None:
    """Why the set at ``shardset.origin`` is no longer the one the run started with (None when it
    is): its ``shards.json`` was replaced, e.g. by a new build published to the same place."""
    if not shardset.origin:
        return None
    try:
        data = (Path(shardset.origin).read_bytes() if fmt.is_local(shardset.origin)
                else read_bytes(shardset.origin, policy))
    except OSError as e:
        return f"{shardset.origin} cannot be read any more ({e})"
    if hashlib.sha256(data).hexdigest() != shardset.fingerprint:
        return f"{shardset.origin} was replaced while this run was reading it"
    return None
