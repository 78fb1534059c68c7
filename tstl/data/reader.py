"""Samples by index row: the node cache first, then one request per run of adjacent samples of a
shard.

``SampleReader.fetch(rows)`` returns the samples of the given index rows (``ShardList.rows``
entries) in that order, each ``{"__key__", "_shard", <ext>: bytes, ...}`` or, when it could not be
read, ``{"__key__", "_shard", "_error": reason}``. Reads are grouped by shard (one open per shard
and call; local files stay open across calls), adjacent samples are coalesced into one ranged
request, and a request that breaks is retried from the first sample it had not delivered whole. A
source that cannot read ranges (a ``pipe:`` command without ``{offset}``, an http server that
ignores ``Range``) is streamed from the start of the shard up to the last sample wanted; with a node
cache, the whole shard is streamed once per node (under a node-wide lock) and every sample goes into
the cache.
"""

from __future__ import annotations

import io
import logging
import tarfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from webdataset.tariterators import base_plus_ext

from tstl.core.shards import SampleIndex, ShardSetError
from tstl.core.transport import (
    DEFAULT_POLICY,
    READ_ERRORS,
    RangeReader,
    ReadPolicy,
    ShortRead,
    is_remote,
    open_stream,
    retrying,
)
from tstl.data.cache import NodeCache
from tstl.data.sources import ShardList

logger = logging.getLogger(__name__)

MAX_GAP = 0
"""Samples of a shard at most this many bytes apart are read in one request (the gap is read and
dropped). 0: only neighbours in the tar are coalesced, so no byte is read that no sample needs."""
MAX_REQUEST = 32 * 2**20
"""A coalesced request stops growing at this many bytes."""


class ShardSetChanged(ShardSetError):
    """The bytes on disk or on the server are not the ones the index describes: the set was rebuilt
    or replaced under a running job."""


def parse_record(data: bytes) -> tuple[str, dict[str, bytes]]:
    """The key and parts of one sample's tar record (its members, without the end-of-archive
    blocks)."""
    key, parts = None, {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            split = base_plus_ext(member.name) if member.isfile() else None
            if split is None:
                continue
            k, ext = split
            if key is not None and k != key:
                raise tarfile.TarError(f"the record holds two samples ({key}, {k})")
            key = k
            parts[ext.lower()] = tar.extractfile(member).read()
    if key is None:
        raise tarfile.TarError("no member in the record")
    return key, parts


@dataclass
class _Want:
    """A sample to read: its index row and place in the request."""

    row: int
    offset: int
    length: int


class SampleReader:
    """Reads samples of one ``ShardList`` in one process (a DataLoader worker).

    Args:
        shardset: the resolved source.
        policy: stall timeout and retries of remote reads.
        cache: the node cache for remote sets (None: no cache).
    """

    def __init__(self, shardset: ShardList, policy: ReadPolicy = DEFAULT_POLICY,
                 cache: NodeCache | None = None) -> None:
        self.ss, self.policy, self.cache = shardset, policy, cache
        self.io = RangeReader(policy.timeout_s)
        self.bytes_read = 0  # from the source (not the cache), for tests and benchmarks
        # the worker's prefetch thread and its main thread share one reader
        self._lock = threading.Lock()

    def close(self) -> None:
        self.io.close()

    # ---- the one entry point ---------------------------------------------------------------------
    def fetch(self, rows: Sequence[int]) -> list[dict]:
        """The samples of ``rows`` (index rows, repeats allowed), in that order."""
        with self._lock:
            return self._fetch(rows)

    def _fetch(self, rows: Sequence[int]) -> list[dict]:
        found: dict[int, dict] = {}
        missing = []
        for row in dict.fromkeys(int(r) for r in rows):
            data = self._cached(row)
            if data is not None:
                found[row] = self._sample(row, data)
            else:
                missing.append(row)
        for shard, runs in group_runs(self.ss.index, missing).items():
            url = self.ss.shards[shard].url
            for run in runs:
                if not self.io.ranges(url):
                    break
                found.update(self._read_run(url, run))
            # also when the first ranged answer showed the server cannot
            if not self.io.ranges(url):
                found.update(self._stream(shard, [w for run in runs for w in run
                                                  if w.row not in found]))
        return [found[int(r)] for r in rows]

    # ---- pieces ----------------------------------------------------------------------------------
    def _cached(self, row: int) -> bytes | None:
        if self.cache is None:
            return None
        ix = self.ss.index
        return self.cache.get(self.ss.shards[int(ix.shard[row])].name, int(ix.offset[row]),
                              int(ix.length[row]))

    def _keep(self, row: int, data: bytes) -> None:
        if self.cache is not None:
            ix = self.ss.index
            self.cache.put(self.ss.shards[int(ix.shard[row])].name, int(ix.offset[row]), data)

    def _sample(self, row: int, data: bytes) -> dict:
        ix = self.ss.index
        shard = self.ss.shards[int(ix.shard[row])]
        want = ix.key[row].decode()
        try:
            key, parts = parse_record(data)
        except (tarfile.TarError, ValueError) as e:
            return {"__key__": want, "_shard": shard.name, "_error": f"unreadable tar record: {e}"}
        if key != want:
            raise ShardSetChanged(
                f"{shard.url}: the bytes at offset {int(ix.offset[row])} are sample '{key}', "
                f"the index says '{want}': the shard set was rebuilt or replaced after this run "
                "read its index. Do not rebuild a set a job is reading; rerun the job (it resumes "
                "from its last checkpoint) to read the new set")
        return {**parts, "__key__": key, "_shard": shard.name}

    def _bad(self, row: int, reason: str) -> dict:
        ix = self.ss.index
        return {"__key__": ix.key[row].decode(), "_shard": self.ss.shards[int(ix.shard[row])].name,
                "_error": reason}

    def _read_run(self, url: str, run: list[_Want]) -> dict[int, dict]:
        """One ranged request for a run of samples; a retry goes on at the first sample not
        delivered whole."""
        out: dict[int, dict] = {}
        todo = list(run)

        def once(_attempt: int) -> None:
            start = todo[0].offset
            end = todo[-1].offset + todo[-1].length
            try:
                data = self.io.read(url, start, end - start)
            except ShortRead as e:
                self._take(todo, start, e.data, out)
                raise
            self._take(todo, start, data, out)

        try:
            retrying(url, self.policy, "ranged read", once, fatal=(ShardSetError,))
        except ShardSetError:
            raise
        except FileNotFoundError as e:
            raise ShardSetChanged(f"{url}: no longer there ({e.strerror}); the shard set was "
                                  "rebuilt or removed under this run: rerun it (it resumes from "
                                  "its last checkpoint)") from e
        except READ_ERRORS as e:
            if not self.io.ranges(url):
                return out  # the server sent the whole file: the caller streams the rest
            reason = self._unreadable(url, e)
            for w in todo:
                out[w.row] = self._bad(w.row, reason)
        return out

    def _unreadable(self, url: str, e: Exception) -> str:
        """The quarantine reason of samples a source did not deliver after its retries."""
        tries = (f" after {self.policy.retries + 1} attempts"
                 if self.policy.retries and is_remote(url) else "")
        logger.error("%s: unreadable%s: %s", url, tries, e)
        return f"shard unreadable{tries}: {type(e).__name__}: {e}"

    def _take(self, todo: list[_Want], start: int, data: bytes, out: dict[int, dict]) -> None:
        """Move the samples that ``data`` (read from ``start``) holds whole from ``todo`` into
        ``out``."""
        self.bytes_read += len(data)
        while todo and todo[0].offset + todo[0].length <= start + len(data):
            w = todo.pop(0)
            record = data[w.offset - start:w.offset - start + w.length]
            self._keep(w.row, record)
            out[w.row] = self._sample(w.row, record)

    def _stream(self, shard: int, wants: list[_Want]) -> dict[int, dict]:
        """Samples of a shard that cannot be read by range: stream it from the start (once per node
        with a cache, taking every sample into the cache; else only up to the last sample
        wanted)."""
        if not wants:
            return {}
        url, name = self.ss.shards[shard].url, self.ss.shards[shard].name
        if self.cache is None:
            return self._stream_pass(shard, url, wants, whole=False)
        with self.cache.shard_lock(name, timeout_s=max(600.0, 10 * self.policy.timeout_s)):
            # another process' pass
            got = {w.row: d for w in wants if (d := self._cached(w.row)) is not None}
            out = {row: self._sample(row, d) for row, d in got.items()}
            rest = [w for w in wants if w.row not in got]
            if rest:
                out.update(self._stream_pass(shard, url, rest, whole=True))
        return out

    def _stream_pass(self, shard: int, url: str, wants: list[_Want],
                     whole: bool) -> dict[int, dict]:
        ix = self.ss.index
        rows = [int(r) for r in _shard_rows(ix, shard)]
        every = ([_Want(r, int(ix.offset[r]), int(ix.length[r])) for r in rows] if whole
                 else list(wants))
        wanted = {w.row for w in wants}
        out: dict[int, dict] = {}
        todo = list(every)

        def once(_attempt: int) -> None:
            with open_stream(url, self.policy.timeout_s) as f:
                pos = 0
                while todo:
                    w = todo[0]
                    _skip(f, w.offset - pos, url)
                    record = f.read(w.length)
                    if len(record) != w.length:
                        raise ShortRead(f"{url}: ended inside sample {ix.key[w.row].decode()}")
                    self.bytes_read += w.offset - pos + w.length
                    pos = w.offset + w.length
                    todo.pop(0)
                    self._keep(w.row, record)
                    if w.row in wanted:
                        out[w.row] = self._sample(w.row, record)

        try:
            retrying(url, self.policy, "streamed read", once, fatal=(ShardSetError,))
        except ShardSetError:
            raise
        except READ_ERRORS as e:
            reason = self._unreadable(url, e)
            for w in wants:
                out.setdefault(w.row, self._bad(w.row, reason))
        return out


def _skip(f, n: int, url: str) -> None:
    while n > 0:
        data = f.read(min(n, 1 << 20))
        if not data:
            raise ShortRead(f"{url}: ended before the samples the index lists")
        n -= len(data)


def _shard_rows(ix, shard: int):
    import numpy as np

    return np.flatnonzero(ix.shard == shard)


def group_runs(ix: SampleIndex, rows: Sequence[int]) -> dict[int, list[list[_Want]]]:
    """The requests that read ``rows``: per shard (in order of first use), runs of samples sorted by
    offset that one ranged request each reads (adjacent samples, or gaps under ``MAX_GAP``, up to
    ``MAX_REQUEST`` bytes)."""
    by_shard: dict[int, list[_Want]] = {}
    for row in dict.fromkeys(int(r) for r in rows):
        by_shard.setdefault(int(ix.shard[row]), []).append(
            _Want(row, int(ix.offset[row]), int(ix.length[row])))
    return {shard: _runs(sorted(wants, key=lambda w: w.offset))
            for shard, wants in by_shard.items()}


def request_bytes(ix: SampleIndex, rows: Sequence[int]) -> tuple[int, int]:
    """(requests, bytes) that reading ``rows`` by range costs (the I/O planner's unit)."""
    runs = [run for shard_runs in group_runs(ix, rows).values() for run in shard_runs]
    return len(runs), sum(run[-1].offset + run[-1].length - run[0].offset for run in runs)


def _runs(wants: list[_Want]) -> list[list[_Want]]:
    """Coalesce samples sorted by offset into runs read with one request each."""
    runs: list[list[_Want]] = []
    for w in wants:
        if runs:
            last = runs[-1][-1]
            gap = w.offset - (last.offset + last.length)
            size = w.offset + w.length - runs[-1][0].offset
            if 0 <= gap <= MAX_GAP and size <= MAX_REQUEST:
                runs[-1].append(w)
                continue
        runs.append([w])
    return runs
