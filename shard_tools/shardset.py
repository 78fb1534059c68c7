"""The on-disk description of a shard set: ``shards.json`` (small, readable over http) and ``manifest.parquet``.

``shards.json``::

    {"format": 1, "dataset": "ssv2", "split": "train", "num_samples": 168913, "num_shards": 660,
     "num_classes": 174, "classes": ["Approaching something with your camera", ...],
     "shards": [{"name": "shard-000000.tar", "samples": 256, "bytes": 23011840, "sha256": "..."}, ...],
     "missing": ["123.mp4", ...], "params": {...}}

``manifest.parquet`` has one row per shard: ``shard, samples, bytes, sha256, class_hist`` (JSON object label ->
count), ``plan_hash`` (what the shard was built from, so a rerun knows whether it is still current) and
``first_key``/``last_key``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

INDEX = "shards.json"
MANIFEST = "manifest.parquet"
PARTS = ("cls", "json", "mp4")  # every sample has exactly these parts, stored in this order

SCHEMA = pa.schema([
    ("shard", pa.string()), ("samples", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string()),
    ("class_hist", pa.string()), ("plan_hash", pa.string()), ("first_key", pa.string()), ("last_key", pa.string()),
])


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str
    class_hist: dict[int, int] = field(default_factory=dict)
    plan_hash: str = ""
    first_key: str = ""
    last_key: str = ""


@dataclass
class ShardSet:
    dataset: str
    split: str
    classes: list[str]
    shards: list[ShardInfo]
    missing: list[str] = field(default_factory=list)
    params: dict = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def class_hist(self) -> dict[int, int]:
        total: dict[int, int] = {}
        for s in self.shards:
            for k, v in s.class_hist.items():
                total[k] = total.get(k, 0) + v
        return dict(sorted(total.items()))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save(shard_dir: Path, ss: ShardSet) -> None:
    """Write ``shards.json`` and ``manifest.parquet`` atomically."""
    index = {
        "format": 1, "dataset": ss.dataset, "split": ss.split, "num_samples": ss.num_samples,
        "num_shards": len(ss.shards), "num_classes": len(ss.classes), "classes": ss.classes,
        "shards": [{"name": s.name, "samples": s.samples, "bytes": s.bytes, "sha256": s.sha256} for s in ss.shards],
        "missing": ss.missing, "params": ss.params,
    }
    rows = [{**asdict(s), "shard": s.name, "class_hist": json.dumps({str(k): v for k, v in s.class_hist.items()})}
            for s in ss.shards]
    table = pa.Table.from_pylist([{c: r[c] for c in SCHEMA.names} for r in rows], schema=SCHEMA)
    tmp = shard_dir / f".{MANIFEST}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, shard_dir / MANIFEST)
    _atomic_write(shard_dir / INDEX, json.dumps(index, indent=1).encode())


def load(shard_dir: Path) -> ShardSet:
    """Read a shard set's description; raises FileNotFoundError with the fix when there is none."""
    index_path = shard_dir / INDEX
    if not index_path.exists():
        raise FileNotFoundError(f"{index_path} not found: build the shard set with `python -m shard_tools.cli build`")
    index = json.loads(index_path.read_text())
    extra = {}
    if (shard_dir / MANIFEST).exists():
        for row in pq.read_table(shard_dir / MANIFEST).to_pylist():
            extra[row["shard"]] = row
    shards = []
    for s in index["shards"]:
        row = extra.get(s["name"], {})
        hist = {int(k): v for k, v in json.loads(row.get("class_hist") or "{}").items()}
        shards.append(ShardInfo(s["name"], s["samples"], s["bytes"], s["sha256"], hist, row.get("plan_hash", ""),
                                row.get("first_key", ""), row.get("last_key", "")))
    return ShardSet(index["dataset"], index["split"], index["classes"], shards, index.get("missing", []),
                    index.get("params", {}))
