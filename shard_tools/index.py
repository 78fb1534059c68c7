"""Add the per-sample index (``samples.parquet``) to a shard set built before it existed, without
touching a tar.

A local set gets a new generation: hard links to its tars plus the index and an updated
``shards.json``, switched in atomically like a build (``shard_tools.publish``), so a running job
keeps reading the old generation. A remote set (http(s), ``pipe:``), or one the user may not write,
is indexed into ``--out``: its shards are read through once and ``samples.parquet`` and the updated
``shards.json`` are written there, to be published beside the set.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from shard_tools.publish import Staging, current, link_or_copy
from tstl.core import shards
from tstl.core.shards import ShardSet
from tstl.core.transport import DEFAULT_POLICY, READ_ERRORS, ReadPolicy, open_stream, retrying

logger = logging.getLogger(__name__)


def index_in_place(shard_dir: Path) -> tuple[ShardSet, bool]:
    """Index a local set as a new generation of itself; returns the set and whether anything
    changed."""
    src = current(shard_dir) or shard_dir
    ss = shards.load(src)
    if ss.samples is not None and (src / ss.samples["name"]).exists():
        return ss, False
    with Staging(shard_dir) as stage:
        src = current(shard_dir) or src  # a plain folder was moved to a generation on entering
        for s in tqdm(ss.shards, desc=f"link {shard_dir.name}", unit="shard",
                      disable=len(ss.shards) < 50):
            link_or_copy(src / s.name, stage.dir / s.name)
        shards.save(stage.dir, ss)  # scans the tars' headers into samples.parquet
        stage.publish()
    return ss, True


def index_to(source: str, out: Path, policy: ReadPolicy = DEFAULT_POLICY) -> ShardSet:
    """Index the set whose ``shards.json`` is at ``source`` (a folder, path or URL) into ``out``."""
    url = source.rstrip("/")
    if not url.endswith(shards.INDEX):
        url = f"{url}/{shards.INDEX}"
    ss = shards.read_index(url)
    per_shard = []
    for s in tqdm(ss.shards, desc="index", unit="shard"):
        shard_url = shards.sibling(url, s.name)

        def once(_attempt: int, shard_url: str = shard_url) -> list:
            with open_stream(shard_url, policy.timeout_s) as f:
                return shards.scan_tar(f, stream=not shards.is_local(shard_url))

        try:
            rows = retrying(shard_url, policy, "scan", once)
        except READ_ERRORS as e:
            raise OSError(f"{shard_url}: cannot be read to index it "
                          f"({type(e).__name__}: {e})") from e
        if len(rows) != s.samples:
            raise shards.ShardSetError(f"{shard_url}: {len(rows)} samples, {url} says {s.samples}; "
                                       "rebuild the set with `make shards`")
        per_shard.append(rows)
    out.mkdir(parents=True, exist_ok=True)
    ss.samples = shards.write_samples(out, ss, shards.index_from_rows(per_shard))
    tmp = out / f".{shards.INDEX}.tmp"
    tmp.write_bytes(shards.index_bytes(ss))
    tmp.replace(out / shards.INDEX)
    return ss
