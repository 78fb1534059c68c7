"""Reproducible tar shards: fixed member metadata and order, written under a temporary name and
renamed.

Every member gets mtime 0, uid/gid 0, empty user/group names and mode 0644, and the parts of a
sample are written in a fixed order, so the same samples always give byte-identical shards (and the
same sha256).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from tstl.core.faults import fault_point

Sample = tuple[str, dict[str, bytes]]  # (key, {extension: bytes})


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_tar(path: Path, samples: Iterable[Sample]) -> tuple[int, str]:
    """Write samples to ``path`` atomically. Returns (size in bytes, sha256 hex)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, parts in samples:
                    if "." in key:
                        raise ValueError(f"sample key '{key}' contains a dot; webdataset splits "
                                         "keys at the first dot")
                    for ext in sorted(parts):
                        data = parts[ext]
                        tar.addfile(_member(f"{key}.{ext}", len(data)), io.BytesIO(data))
            raw.flush()
            os.fsync(raw.fileno())
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
        fault_point("shards.tar.tmp")
        os.replace(tmp, path)
        fault_point("shards.tar")
    finally:
        tmp.unlink(missing_ok=True)
    return size, digest


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def iter_samples(path: Path) -> Iterator[Sample]:
    """Samples of a shard, grouped by key in file order (raises tarfile.TarError on a damaged
    tar)."""
    key, parts = None, {}
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, _, ext = member.name.partition(".")
            if k != key and key is not None:
                yield key, parts
                parts = {}
            key = k
            f = tar.extractfile(member)
            parts[ext] = f.read() if f else b""
    if key is not None:
        yield key, parts
