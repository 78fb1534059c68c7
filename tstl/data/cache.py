"""A node-local cache of remote shard samples (``data.cache_dir``), shared by every rank and worker
of a node.

What one epoch fetched from an http(s) or ``pipe:`` set is read from local disk in the next. Entries
are the exact bytes of one sample's tar record, ``<cache_dir>/<set id>/<shard>/<offset>``, where the
set id is a hash of the set's ``shards.json``: a rebuilt set never reads an older set's bytes. Every
hit is checked against the length the index records (and the reader checks the record's key), so a
damaged entry is dropped and fetched again, never used.

Concurrency: entries are written under a temporary name and renamed, so a reader sees a whole entry
or none, and two processes fetching the same sample both succeed. A shard that can only be streamed
whole is streamed by one process of the node at a time (``shard_lock``); the others wait and then
read it from here. Eviction (least recently used first, by modification time, which a hit refreshes)
runs in the one process that holds ``.evict.lock``.

A full or unwritable cache disk turns writing off with one warning; reads go on from the source.
Written here rather than taken from MosaicML Streaming: its cache holds whole shards, which on a
cluster means every node downloads every shard it touches; caching samples keeps the bytes a node
fetches equal to the bytes it needs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

EVICT_TARGET = 0.9
"""Eviction brings the cache down to this fraction of its limit (so it does not run at every
write)."""


def set_id(fingerprint: str) -> str:
    """The cache folder name of a shard set whose ``shards.json`` (or shard list) hashes to
    ``fingerprint``."""
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:16]


class NodeCache:
    """Samples of one remote shard set on local disk.

    Args:
        root: ``data.cache_dir``.
        fingerprint: identifies the set's content (``ShardList.fingerprint``).
        limit_bytes: total size of everything under ``root`` (all sets); 0 = only the disk limits
            it.
    """

    def __init__(self, root: str | os.PathLike, fingerprint: str, limit_bytes: int = 0) -> None:
        self.root = Path(root)
        self.dir = self.root / set_id(fingerprint)
        self.limit = int(limit_bytes)
        self.writable = True
        self.hits = self.misses = self.written = 0
        self._added = 0  # bytes this process wrote since its last eviction pass
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._disable(e)

    # ---- entries ---------------------------------------------------------------------------------
    def _path(self, shard: str, offset: int) -> Path:
        return self.dir / shard / str(offset)

    def get(self, shard: str, offset: int, length: int) -> bytes | None:
        """The cached record of the sample at ``offset`` of ``shard``, or None (absent, or not
        ``length`` bytes)."""
        path = self._path(shard, offset)
        try:
            with open(path, "rb") as f:
                data = f.read(length + 1)
        except OSError:
            self.misses += 1
            return None
        if len(data) != length:
            logger.warning("%s: %d bytes, the index says %d; dropped from the cache", path,
                           len(data), length)
            with contextlib.suppress(OSError):
                path.unlink()
            self.misses += 1
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recency for the LRU eviction
        self.hits += 1
        return data

    def put(self, shard: str, offset: int, data: bytes) -> None:
        """Keep a fetched record (atomically); a write error turns writing off for this process,
        with a warning."""
        if not self.writable:
            return
        path = self._path(shard, offset)
        if path.exists():
            return
        tmp = path.with_name(f".{offset}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._disable(e)
            return
        self.written += len(data)
        self._added += len(data)
        if self.limit and self._added > self.limit // 32:
            self.evict()

    def _disable(self, e: OSError) -> None:
        self.writable = False
        logger.warning("data.cache_dir %s: cannot write (%s); reading from the source without "
                       "caching from now on (free space or point data.cache_dir elsewhere)",
                       self.root, e.strerror or e)

    # ---- whole-shard streaming -------------------------------------------------------------------
    @contextlib.contextmanager
    def shard_lock(self, shard: str, timeout_s: float = 0.0) -> Iterator[bool]:
        """Hold the node-wide lock of ``shard`` while streaming it; yields False when it could not
        be taken (unwritable cache, or ``timeout_s`` passed: the caller streams anyway)."""
        if not self.writable:
            yield False
            return
        try:
            fd = os.open(self.dir / f".{shard}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        except OSError:
            yield False
            return
        try:
            yield _flock(fd, timeout_s)
        finally:
            os.close(fd)  # closing releases the lock

    # ---- eviction --------------------------------------------------------------------------------
    def evict(self) -> int:
        """Remove least recently used entries until the cache is under ``EVICT_TARGET`` of its
        limit; returns the bytes removed (0 when another process is evicting right now)."""
        self._added = 0
        if not self.limit:
            return 0
        try:
            fd = os.open(self.root / ".evict.lock", os.O_CREAT | os.O_RDWR, 0o644)
        except OSError:
            return 0
        try:
            if not _flock(fd, 0.0):
                return 0
            entries = list(_entries(self.root))
            total = sum(size for _, size, _ in entries)
            removed = 0
            if total > self.limit:
                for path, size, _ in sorted(entries, key=lambda e: e[2]):
                    if total - removed <= self.limit * EVICT_TARGET:
                        break
                    with contextlib.suppress(OSError):
                        path.unlink()
                        removed += size
                logger.info("cache %s: %.1f MB over the %.1f MB limit, removed %.1f MB "
                            "(least recently used)", self.root, (total - self.limit) / 1e6,
                            self.limit / 1e6, removed / 1e6)
            return removed
        finally:
            os.close(fd)


def _flock(fd: int, timeout_s: float) -> bool:
    """Take an exclusive lock on ``fd``: at once when ``timeout_s`` is 0, else waiting up to
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _entries(root: Path) -> Iterator[tuple[Path, int, float]]:
    """``(path, size, mtime)`` of every cached record under ``root`` (temporary files and locks left
    out)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            with contextlib.suppress(OSError):
                st = path.stat()
                yield path, st.st_size, st.st_mtime
