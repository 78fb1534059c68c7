"""Bytes from where shards live: local files, http(s) and ``pipe:`` commands, with one retry policy.

Two kinds of read serve every loader need:

* ``RangeReader.read(url, offset, length)``: exactly ``length`` bytes at ``offset`` -- a local
  ``pread`` (files stay open per worker), an http ``Range: bytes=`` request on a kept-alive
  connection, or a ``pipe:`` command whose template has ``{offset}``/``{length}``/``{last}``
  placeholders (``curl -s -r {offset}-{last} URL``,
  ``aws s3api get-object --range bytes={offset}-{last} ...``). A server that answers a ranged
  request with the whole file (200 instead of 206) still works: the bytes before ``offset`` are
  skipped, and the reader is told that this source cannot seek (``ranges(url)``) so it streams whole
  shards instead.
* ``open_stream(url)``: a whole file as a stream (``shards.json``, the index, a shard without
  ranges).

Every remote read has a stall timeout (no byte for ``timeout_s`` fails it, the ``pipe:`` process
group is killed) and a body shorter than promised (http ``Content-Length``, the index's length)
raises ``ShortRead`` carrying what did arrive, so a retry goes on from there instead of from byte 0.
``retrying`` is the one retry loop.

Written here rather than taken from webdataset's ``gopen``: it has no ranged reads, no stall timeout
for http and takes a short body for the end of the file.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import io
import logging
import os
import select
import signal
import subprocess
import tarfile
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

READ_ERRORS = (OSError, tarfile.TarError, ValueError, http.client.HTTPException)
"""What a failed read raises (TimeoutError, ShortRead and urllib's errors are OSErrors)."""

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_RETRIES = 2
RANGE_FIELDS = ("{offset}", "{length}", "{last}")


@dataclass(frozen=True)
class ReadPolicy:
    """Stall timeout (seconds without data; 0 = none) and retries of remote reads
    (``DataConfig.read_*``)."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    retries: int = DEFAULT_RETRIES


DEFAULT_POLICY = ReadPolicy()


class ShortRead(OSError):
    """A body or stream ended before the bytes it promised; ``data`` holds what arrived."""

    def __init__(self, message: str, data: bytes = b"") -> None:
        super().__init__(message)
        self.data = data


def is_remote(url: str) -> bool:
    """Whether ``url`` is read through the network or a command (``pipe:``, http(s)): those get a
    timeout."""
    return url.startswith(("pipe:", "http://", "https://"))


def is_local(url: str) -> bool:
    """Whether ``url`` is a plain local path (not a URL, not a ``pipe:`` command)."""
    return not url.startswith(("pipe:", "file:")) and "://" not in url


def retrying(url: str, policy: ReadPolicy, what: str, fn: Callable[[int], T],
             fatal: tuple[type[BaseException], ...] = ()) -> T:
    """``fn(attempt)`` until it succeeds; a remote read is tried ``1 + policy.retries`` times with a
    growing pause, a local one once. ``fn`` keeps its own progress between attempts (a retry goes on
    where the last one broke). ``fatal`` errors are raised at once (e.g. bytes that are not what the
    index says: retrying cannot help)."""
    for attempt in range(policy.retries + 1):
        try:
            return fn(attempt)
        except fatal:
            raise
        except READ_ERRORS as e:
            if attempt == policy.retries or not is_remote(url):
                raise
            logger.warning("%s: %s failed (%s: %s); retry %d of %d", url, what, type(e).__name__, e,
                           attempt + 1, policy.retries)
            time.sleep(min(0.5 * (attempt + 1), 5.0))
    raise AssertionError("unreachable")


# ---- pipe: commands ------------------------------------------------------------------------------

_LIVE: set[subprocess.Popen] = set()
"""``pipe:`` processes of this process, killed with their groups if the process is told to end
(``orphan_guard``)."""
_LIVE_LOCK = threading.Lock()


def _die_with_parent() -> None:
    """In a child: get SIGKILL when the parent dies (Linux ``PR_SET_PDEATHSIG``), so no command
    outlives a worker."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def kill_live_commands() -> None:
    """Kill the process group of every running ``pipe:`` command of this process."""
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def orphan_guard(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: end this worker (and its ``pipe:`` commands) as soon as its
    parent, the training process, dies -- even by SIGKILL -- instead of reading on for minutes
    (issue 21); live through the stop signals that the trainer handles itself.

    A scheduler signals every process of a job step, workers included (Slurm's time limit and
    ``scancel`` send SIGTERM, a forwarded warning SIGUSR1; so does ``kill -TERM -PGID``). A worker
    that died of it would crash its trainer ("DataLoader worker exited unexpectedly") before the
    trainer, which got the same signal, saves at its next safe point and exits 75. So SIGUSR1 is
    ignored, and the first SIGTERM while the trainer lives: the trainer shuts the workers down.
    A second SIGTERM (``Process.terminate()`` of a worker that did not stop in time, at the
    trainer's exit) or one after the trainer died (``PR_SET_PDEATHSIG``) ends the worker.
    """
    parent = os.getppid()
    spared: list[int] = []

    def _end(*_: object) -> None:
        if os.getppid() == parent and not spared:
            spared.append(1)  # the trainer got it too and stops us in its own time
            return
        kill_live_commands()
        os._exit(1)

    signal.signal(signal.SIGTERM, _end)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        _end()


class PipeStream(io.RawIOBase):
    """stdout of a ``pipe:`` command in its own process group; a read waits at most ``timeout_s``
    for data.

    On a stall, an error or ``close()`` before the end, the whole group is killed
    (``sh -c '...; sleep'`` leaves no ``sleep`` behind). ``expect`` (bytes) turns an early clean
    exit into ``ShortRead``.
    """

    def __init__(self, url: str, timeout_s: float, expect: int | None = None) -> None:
        super().__init__()
        self.url, self.timeout_s, self.left = url, timeout_s, expect
        self.proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        with _LIVE_LOCK:
            _LIVE.add(self.proc)
        self.fd = self.proc.stdout.fileno()
        self.eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        if self.eof:
            return 0
        if self.timeout_s > 0 and not select.select([self.fd], [], [], self.timeout_s)[0]:
            self._kill()
            raise TimeoutError(f"{self.url}: no data for {self.timeout_s:g} s "
                               "(data.read_timeout_s)")
        data = os.read(self.fd, len(buf))
        if not data:
            self.eof = True
            self._finish()
            return 0
        if self.left is not None:
            self.left -= len(data)
        buf[:len(data)] = data
        return len(data)

    def _finish(self) -> None:
        try:
            rc = self.proc.wait(timeout=self.timeout_s or None)
        except subprocess.TimeoutExpired as e:
            self._kill()
            raise TimeoutError(f"{self.url}: closed its output but did not exit within "
                               f"{self.timeout_s:g} s") from e
        if rc:
            raise OSError(f"{self.url}: exited with status {rc}")
        if self.left:
            raise ShortRead(f"{self.url}: ended {self.left} bytes early")

    def _kill(self) -> None:
        # The whole group: also the children of a shell that already exited (the group outlives its
        # leader).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if not self.closed:
            self._kill()
            self.proc.stdout.close()
            with _LIVE_LOCK:
                _LIVE.discard(self.proc)
        super().close()


def range_command(url: str, offset: int, length: int) -> str:
    """A ``pipe:`` URL with its range placeholders filled in."""
    return (url.replace("{offset}", str(offset)).replace("{length}", str(length))
            .replace("{last}", str(offset + length - 1)))


# ---- http(s) -------------------------------------------------------------------------------------

class HttpBody(io.RawIOBase):
    """An http response body that raises ``ShortRead`` when the connection ends before
    ``Content-Length``."""

    def __init__(self, resp: http.client.HTTPResponse, url: str,
                 on_close: Callable[[], None] = lambda: None):
        super().__init__()
        self.resp, self.url, self.on_close = resp, url, on_close

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        # read1: what one recv gives -- readinto would block until the whole buffer is full, so a
        # stalled server would also stall the bytes that did arrive
        data = self.resp.read1(len(buf))
        # http.client returns nothing at a cut, with bytes still promised
        if not data and self.resp.length:
            raise ShortRead(f"{self.url}: the connection closed {self.resp.length} bytes before "
                            "the end of the body (Content-Length)")
        buf[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self.resp.close()
            self.on_close()
        super().close()


class HttpClient:
    """Kept-alive http(s) connections, one per host, for this process (a worker)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.conns: dict[tuple[str, str], http.client.HTTPConnection] = {}

    def get(self, url: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
        """The response to ``GET url`` (redirects followed); raises OSError for a status >= 400."""
        for _ in range(5):
            parts = urllib.parse.urlsplit(url)
            conn = self._conn(parts.scheme, parts.netloc)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            try:
                conn.request("GET", path or "/", headers=headers or {})
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException):
                # a dead kept-alive connection: the retry opens anew
                self.drop(parts.scheme, parts.netloc)
                raise
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                resp.read()
                url = urllib.parse.urljoin(url, resp.getheader("Location"))
                continue
            if resp.status >= 400:
                resp.read()
                raise OSError(f"{url}: HTTP {resp.status} {resp.reason}")
            return resp
        raise OSError(f"{url}: too many redirects")

    def _conn(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        key = (scheme, netloc)
        if key not in self.conns:
            cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
            self.conns[key] = cls(netloc, timeout=self.timeout_s or None)
        return self.conns[key]

    def drop(self, scheme: str, netloc: str) -> None:
        conn = self.conns.pop((scheme, netloc), None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()


# ---- the two reads -------------------------------------------------------------------------------

def open_stream(url: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                http_client: HttpClient | None = None) -> IO[bytes]:
    """A binary stream of a whole file: a local path, ``pipe:`` command or http(s) URL (both with a
    stall timeout of ``timeout_s``, 0 = none; a body cut short raises ``ShortRead``)."""
    if url.startswith("pipe:"):
        return io.BufferedReader(PipeStream(url, timeout_s), buffer_size=1 << 20)
    if url.startswith(("http://", "https://")):
        client = http_client or HttpClient(timeout_s)
        owned = http_client is None
        resp = client.get(url)
        return io.BufferedReader(HttpBody(resp, url, client.close if owned else lambda: None),
                                 1 << 20)
    if is_local(url):
        return open(url, "rb")
    import webdataset as wds  # any other scheme webdataset knows (no timeout there)

    return wds.gopen(url)


def read_bytes(url: str, policy: ReadPolicy = DEFAULT_POLICY) -> bytes:
    """The whole content at ``url`` (small files: ``shards.json``, the index, the manifest),
    retried."""

    def once(_attempt: int) -> bytes:
        with open_stream(url, policy.timeout_s) as f:
            return f.read()

    try:
        return retrying(url, policy, "read", once)
    except READ_ERRORS as e:
        raise OSError(f"{url}: cannot be read ({type(e).__name__}: {e})") from e


class RangeReader:
    """Ranged reads for one process: local files stay open (LRU), http connections are kept alive.

    ``ranges(url)`` says whether ``url`` can be read by range at all; for http it is learnt from the
    first answer.
    """

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, max_open: int = 0) -> None:
        self.timeout_s = timeout_s
        self.files: OrderedDict[str, int] = OrderedDict()
        self.max_open = max_open or _open_file_budget()
        self.http = HttpClient(timeout_s)
        # http hosts that answered a ranged request with the whole file
        self.no_ranges: set[str] = set()
        self.opens = self.requests = 0  # counters for tests and benchmarks

    def ranges(self, url: str) -> bool:
        if url.startswith("pipe:"):
            return "{offset}" in url
        if url.startswith(("http://", "https://")):
            return urllib.parse.urlsplit(url).netloc not in self.no_ranges
        return is_local(url)

    def read(self, url: str, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``; ``ShortRead`` (with what arrived) when the source
        ends early."""
        self.requests += 1
        if url.startswith("pipe:"):
            return self._read_pipe(url, offset, length)
        if url.startswith(("http://", "https://")):
            return self._read_http(url, offset, length)
        return self._read_local(url, offset, length)

    def _read_local(self, path: str, offset: int, length: int) -> bytes:
        fd = self.files.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            self.opens += 1
            while len(self.files) >= self.max_open:
                os.close(self.files.popitem(last=False)[1])
        self.files[path] = fd
        chunks, got = [], 0
        while got < length:
            data = os.pread(fd, length - got, offset + got)
            if not data:
                raise ShortRead(f"{path}: ends {length - got} bytes before offset "
                                f"{offset + length}", b"".join(chunks))
            chunks.append(data)
            got += len(data)
        return b"".join(chunks)

    def _read_http(self, url: str, offset: int, length: int) -> bytes:
        scheme, host = urllib.parse.urlsplit(url)[:2]
        resp = self.http.get(url, {"Range": f"bytes={offset}-{offset + length - 1}"})
        self.opens += 1
        body = HttpBody(resp, url)
        whole = resp.status == 200
        try:
            if whole:  # the server ignores ranges: skip to the offset, and remember the host
                if host not in self.no_ranges:
                    logger.warning("%s: the server ignores Range requests; shards from it are read "
                                   "whole (set data.cache_dir so that happens once per node)",
                                   host)
                    self.no_ranges.add(host)
                _exact(body, offset, url)
            elif (resp.status != 206
                  or not (resp.getheader("Content-Range") or "").startswith(f"bytes {offset}-")):
                raise OSError(f"{url}: asked for bytes {offset}-{offset + length - 1}, "
                              f"got HTTP {resp.status} {resp.getheader('Content-Range')!r}")
            data = _exact(body, length, url)
        except BaseException:
            self.http.drop(scheme, host)
            raise
        # the rest of a whole file is not wanted: drop the connection, not drain it
        if whole or resp.length:
            self.http.drop(scheme, host)
        return data

    def _read_pipe(self, url: str, offset: int, length: int) -> bytes:
        if "{offset}" not in url:
            raise ValueError(f"{url}: a pipe: command without {{offset}} cannot read a range")
        self.opens += 1
        with PipeStream(range_command(url, offset, length), self.timeout_s,
                        expect=length) as stream:
            data = _exact(stream, length, url)
            if stream.read(1):
                raise OSError(f"{url}: sent more than the {length} bytes asked for; check the "
                              "command's range (curl -r {offset}-{last})")
            return data

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()
        self.http.close()


def _open_file_budget() -> int:
    """Local shards a reader keeps open: every shard of an SSV2-sized set (660) where the process'
    file limit allows, so a worker opens each shard once per epoch; half the soft limit
    otherwise."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(16, min(1024, soft // 2 if soft > 0 else 512))


def _exact(stream: IO[bytes], n: int, url: str) -> bytes:
    """Read exactly ``n`` bytes; ``ShortRead`` carries what arrived before the end."""
    chunks, got = [], 0
    try:
        while got < n:
            data = stream.read(n - got)
            if not data:
                raise ShortRead(f"{url}: ended {n - got} bytes early", b"".join(chunks))
            chunks.append(data)
            got += len(data)
    except ShortRead as e:
        if e.data or not chunks:
            raise
        raise ShortRead(str(e), b"".join(chunks)) from e
    return b"".join(chunks)
