"""The shard-set format, owned here: file names, the schema of ``shards.json`` and
``manifest.parquet``, the sample parts, one ``ShardSet``/``ShardInfo`` pair, and reading/writing
them. ``shard_tools`` writes sets, ``tstl.data`` reads them; neither spells a file name, a column or
a sample part itself.

``shards.json`` (small, readable over http and ``pipe:``)::

    {"format": 1, "dataset": "ssv2", "split": "train", "num_samples": 168913, "num_shards": 660,
     "num_classes": 174, "classes": ["Approaching something with your camera", ...],
     "shards": [{"name": "shard-000000.tar", "samples": 256, "bytes": 23011840,
                 "sha256": "..."}, ...],
     "missing": ["123.mp4", ...], "params": {...}}

``samples.parquet`` (the per-sample index, ``SAMPLE_COLUMNS``) has one row per sample, in
``shards.json`` order and tar order within a shard: ``shard`` (name), ``key``, ``offset`` (byte
offset of the sample's first tar header), ``length`` (bytes up to the end of its last member,
padding included) and ``label`` (the ``cls`` part, -1 when missing or not an integer). A loader
reads a sample with one ranged read of ``[offset, offset + length)``; ``shards.json`` names the
index, its size and sha256 under ``"samples"`` (absent in sets built before it existed:
``tstl shards index`` adds it without rewriting the tars).

A multi-head set (EPIC-KITCHENS: verb and noun per sample) adds ``"heads": {"verb": [names...],
"noun": [...]}``; ``classes`` are then the first head's, the class every sample's ``cls`` holds
(absent for single-label sets).

``manifest.parquet`` has one row per shard (``MANIFEST_COLUMNS``):
``shard, samples, bytes, sha256, class_hist`` (JSON object label -> count), ``plan_hash`` (what the
shard was built from, so a rerun knows whether it is still current), ``first_key``/``last_key`` and
``head_hist`` (multi-head sets: JSON object head -> label -> count; ``{}`` otherwise).

A sample is the tar members ``<key>.cls`` (ASCII integer label), ``<key>.json`` (``SAMPLE_KEYS``)
and ``<key>.mp4`` (the video bytes), in that order (``PARTS``). A multi-head sample's json also
holds ``LABELS``: ``{"verb": 3, "noun": 12}``, and its ``cls`` is the first head's label.

pyarrow and webdataset are imported inside the functions that need them, so importing ``tstl.core``
stays cheap.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tstl.core.durable import replace_fsynced
from tstl.core.faults import fault_point
from tstl.core.transport import is_local

INDEX = "shards.json"
MANIFEST = "manifest.parquet"
SAMPLES = "samples.parquet"
FORMAT = 1
PARTS = ("cls", "json", "mp4")  # every sample has exactly these parts, stored in this order
CLS, JSON, MP4 = PARTS
SAMPLE_KEYS = ("id", "label", "class_name", "duration", "frames", "fps", "width", "height",
               "source")
"""Keys of the ``json`` part; ``frames`` is the exact number of video packets counted at pack
time."""
GLOBAL_LABEL = "global_label"
"""Extra ``json`` key of a relabelled subset: the label the sample had in the full set."""
LABELS = "labels"
"""Extra ``json`` key of a multi-head sample: head name -> label (``ShardSet.heads`` names the
heads)."""
MANIFEST_COLUMNS = (("shard", "string"), ("samples", "int64"), ("bytes", "int64"),
                    ("sha256", "string"), ("class_hist", "string"), ("plan_hash", "string"),
                    ("first_key", "string"), ("last_key", "string"), ("head_hist", "string"))


class ShardSetError(ValueError):
    """A shard set on disk disagrees with its ``shards.json``; the message names the shard and the
    fix."""


@dataclass
class ShardInfo:
    """One shard as ``shards.json`` and the manifest describe it."""

    name: str
    samples: int
    bytes: int
    sha256: str
    class_hist: dict[int, int] = field(default_factory=dict)
    plan_hash: str = ""
    first_key: str = ""
    last_key: str = ""
    head_hist: dict[str, dict[int, int]] = field(default_factory=dict)
    """Multi-head sets: label counts per head."""


@dataclass
class ShardSet:
    """A shard set's description: what ``shards.json`` (plus the manifest, when read locally)
    says."""

    dataset: str
    split: str
    classes: list[str]
    shards: list[ShardInfo]
    missing: list[str] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    samples: dict | None = None
    """``{"name", "bytes", "sha256", "rows"}`` of the per-sample index (``SAMPLES``); None: the set
    has none."""
    heads: dict[str, list[str]] = field(default_factory=dict)
    """Multi-head sets: class names per head (the first head's are ``classes``); empty for one
    label."""

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_hist(self) -> dict[int, int]:
        total: dict[int, int] = {}
        for s in self.shards:
            for k, v in s.class_hist.items():
                total[k] = total.get(k, 0) + v
        return dict(sorted(total.items()))

    def head_hist(self) -> dict[str, dict[int, int]]:
        """Label counts per head over all shards (multi-head sets; empty otherwise)."""
        total: dict[str, dict[int, int]] = {h: {} for h in self.heads}
        for s in self.shards:
            for h, hist in s.head_hist.items():
                for k, v in hist.items():
                    total.setdefault(h, {})[k] = total.get(h, {}).get(k, 0) + v
        return {h: dict(sorted(c.items())) for h, c in total.items()}


def manifest_schema() -> Any:
    """The pyarrow schema of ``manifest.parquet``."""
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind)()) for name, kind in MANIFEST_COLUMNS])


def index_bytes(ss: ShardSet) -> bytes:
    """``shards.json`` of ``ss``, exactly as ``save`` writes it."""
    index = {
        "format": FORMAT, "dataset": ss.dataset, "split": ss.split, "num_samples": ss.num_samples,
        "num_shards": len(ss.shards), "num_classes": ss.num_classes, "classes": ss.classes,
        "shards": [{"name": s.name, "samples": s.samples, "bytes": s.bytes, "sha256": s.sha256}
                   for s in ss.shards],
        "missing": ss.missing, "params": ss.params,
    }
    if ss.samples is not None:
        index["samples"] = ss.samples
    if ss.heads:
        index["heads"] = ss.heads
    return json.dumps(index, indent=1).encode()


def write_manifest(path: Path, shards: list[ShardInfo]) -> None:
    """Write ``manifest.parquet`` atomically (temporary name, then rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"shard": s.name, "samples": s.samples, "bytes": s.bytes, "sha256": s.sha256,
             "class_hist": json.dumps({str(k): v for k, v in s.class_hist.items()}),
             "plan_hash": s.plan_hash, "first_key": s.first_key, "last_key": s.last_key,
             "head_hist": json.dumps({h: {str(k): v for k, v in c.items()}
                                      for h, c in s.head_hist.items()})}
            for s in shards]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(pa.Table.from_pylist(rows, schema=manifest_schema()), tmp)
    fault_point("shards.manifest.tmp")
    replace_fsynced(tmp, path)
    fault_point("shards.manifest")


def save(shard_dir: Path, ss: ShardSet) -> None:
    """Write ``samples.parquet``, ``manifest.parquet`` and ``shards.json`` of ``ss`` into
    ``shard_dir``, each atomically; the per-sample index is read from the tars in ``shard_dir``
    (headers only), so every writer of a set gets it and it always describes the bytes on disk."""
    ss.samples = write_samples(shard_dir, ss, scan_set(shard_dir, ss))
    write_manifest(shard_dir / MANIFEST, ss.shards)
    tmp = shard_dir / f".{INDEX}.tmp-{os.getpid()}"
    tmp.write_bytes(index_bytes(ss))
    fault_point("shards.index.tmp")
    replace_fsynced(tmp, shard_dir / INDEX)
    fault_point("shards.index")


def read_manifest(path: str | os.PathLike) -> dict[str, ShardInfo]:
    """Rows of a local ``manifest.parquet`` by shard name."""
    import pyarrow.parquet as pq

    out = {}
    for row in pq.read_table(path).to_pylist():
        hist = {int(k): int(v) for k, v in json.loads(row.get("class_hist") or "{}").items()}
        heads = {h: {int(k): int(v) for k, v in c.items()}
                 for h, c in json.loads(row.get("head_hist") or "{}").items()}
        out[row["shard"]] = ShardInfo(row["shard"], int(row["samples"]), int(row["bytes"]),
                                      row["sha256"] or "", hist, row.get("plan_hash") or "",
                                      row.get("first_key") or "", row.get("last_key") or "")
        out[row["shard"]].head_hist = heads
    return out


def parse_index(data: bytes | str, source: str) -> ShardSet:
    """A ``ShardSet`` from the text of a ``shards.json`` (``source`` names it in errors)."""
    try:
        index = json.loads(data)
        shards = [ShardInfo(s["name"], int(s["samples"]), int(s.get("bytes", -1)),
                            s.get("sha256", ""))
                  for s in index["shards"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ShardSetError(f"{source}: not a valid {INDEX} ({type(e).__name__}: {e}); rebuild it "
                            "with `make shards`") from e
    return ShardSet(index.get("dataset", ""), index.get("split", ""),
                    list(index.get("classes") or []), shards, index.get("missing", []),
                    index.get("params", {}), index.get("samples"),
                    {str(h): list(names) for h, names in (index.get("heads") or {}).items()})


def read_index(url: str | os.PathLike) -> ShardSet:
    """Read a ``shards.json`` from a local path, an http(s) URL or a ``pipe:`` command (``bytes`` is
    -1 where the file does not give it; the manifest is not read)."""
    text = os.fspath(url)
    try:
        if is_local(text):
            data = Path(text).read_bytes()
        else:
            from tstl.core.transport import read_bytes  # the one transport

            data = read_bytes(text)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{text}: cannot read the shard list ({e}); run `make shards` or "
                                "fix the path") from e
    return parse_index(data, text)


def load(shard_dir: str | os.PathLike) -> ShardSet:
    """Read a local shard set's ``shards.json`` and manifest; raises FileNotFoundError with the fix
    when absent."""
    shard_dir = Path(shard_dir)
    index_path = shard_dir / INDEX
    if not index_path.exists():
        raise FileNotFoundError(f"{index_path} not found: build the shard set with "
                                "`tstl shards build` (make shards DATASET=...)")
    ss = parse_index(index_path.read_bytes(), str(index_path))
    extra = read_manifest(shard_dir / MANIFEST) if (shard_dir / MANIFEST).exists() else {}
    for s in ss.shards:
        if (row := extra.get(s.name)) is not None:
            s.class_hist, s.plan_hash, s.first_key, s.last_key = row.class_hist, row.plan_hash, \
                row.first_key, row.last_key
            s.head_hist = row.head_hist
    return ss




def sibling(url: str, name: str) -> str:
    """Location of ``name`` next to ``url`` (a local path or a URL)."""
    head, sep, _ = url.rpartition("/")
    return f"{head}{sep}{name}" if sep else name


# ---- the per-sample index (samples.parquet) ------------------------------------------------------

SAMPLE_COLUMNS = (("shard", "string"), ("key", "string"), ("offset", "int64"), ("length", "int64"),
                  ("label", "int64"))
_BLOCK = 512  # tar block size: members and headers start on these boundaries


@dataclass
class SampleIndex:
    """Where every sample of a set lies, as arrays aligned by sample row (``shards.json`` order, tar
    order within a shard). NumPy arrays rather than row objects: an SSV2-sized index is ~5 MB in
    every worker."""

    shard: Any
    """int32 [N]: position of the sample's shard in ``ShardSet.shards``."""
    offset: Any
    """int64 [N]: byte offset of the sample's first tar header in its shard."""
    length: Any
    """int64 [N]: bytes from ``offset`` to the end of the sample's last member (block padding
    included)."""
    label: Any
    """int64 [N]: the ``cls`` part (-1: missing or not an integer)."""
    key: Any
    """bytes [N] (NumPy ``S`` dtype): the sample key (``__key__``)."""

    def __len__(self) -> int:
        return len(self.offset)

    def counts(self, num_shards: int) -> list[int]:
        """Samples per shard."""
        import numpy as np

        return np.bincount(self.shard, minlength=num_shards).tolist()


def scan_tar(fileobj: IO[bytes], stream: bool = False) -> list[tuple[str, int, int, int]]:
    """``(key, offset, length, label)`` of every sample of a tar, from its headers.

    A seekable file is read header by header (the member data is skipped, except the few bytes of
    ``cls``), so a local shard costs a few hundred small reads; ``stream=True`` reads a pipe or
    socket through. Members are grouped into samples by key as webdataset does (``base_plus_ext``:
    the basename up to its first dot).
    """
    from webdataset.tariterators import base_plus_ext

    rows: list[tuple[str, int, int, int]] = []
    key, start, end, label = None, 0, 0, -1
    with tarfile.open(fileobj=fileobj, mode="r|" if stream else "r:") as tar:
        for member in tar:
            split = base_plus_ext(member.name) if member.isfile() else None
            if split is None:
                continue
            k, ext = split
            if k != key:
                if key is not None:
                    rows.append((key, start, end - start, label))
                key, start, label = k, member.offset, -1
            end = member.offset_data + -(-member.size // _BLOCK) * _BLOCK
            if ext.lower() == CLS:
                label = _int_or(tar.extractfile(member).read(), -1)
    if key is not None:
        rows.append((key, start, end - start, label))
    return rows


def _int_or(data: bytes, default: int) -> int:
    try:
        return int(data)
    except ValueError:
        return default


def index_from_rows(per_shard: list[list[tuple[str, int, int, int]]]) -> SampleIndex:
    """A ``SampleIndex`` from the ``scan_tar`` rows of each shard, in set order."""
    import numpy as np

    rows = [r for shard in per_shard for r in shard]
    return SampleIndex(
        shard=np.repeat(np.arange(len(per_shard), dtype=np.int32), [len(s) for s in per_shard]),
        offset=np.array([r[1] for r in rows], dtype=np.int64),
        length=np.array([r[2] for r in rows], dtype=np.int64),
        label=np.array([r[3] for r in rows], dtype=np.int64),
        key=np.array([r[0].encode() for r in rows], dtype=np.bytes_) if rows else np.zeros(0, "S1"))


def scan_set(shard_dir: Path, ss: ShardSet) -> SampleIndex:
    """The index of a local set, read from its tars' headers (seconds for an SSV2-sized set)."""
    per_shard = []
    for s in ss.shards:
        path = shard_dir / s.name
        try:
            with open(path, "rb") as f:
                rows = scan_tar(f)
        except (OSError, tarfile.TarError) as e:
            raise ShardSetError(f"{path}: cannot be indexed ({type(e).__name__}: {e}); rebuild the "
                                "set with `make shards`") from e
        if len(rows) != s.samples:
            raise ShardSetError(f"{path}: {len(rows)} samples, {INDEX} says {s.samples}; rebuild "
                                "the set with `make shards`")
        per_shard.append(rows)
    return index_from_rows(per_shard)


def samples_table(ss: ShardSet, index: SampleIndex) -> Any:
    """The pyarrow table of ``samples.parquet``."""
    import pyarrow as pa

    names = [s.name for s in ss.shards]
    cols = {"shard": [names[i] for i in index.shard.tolist()],
            "key": [k.decode() for k in index.key.tolist()],
            "offset": index.offset, "length": index.length, "label": index.label}
    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in SAMPLE_COLUMNS])
    return pa.Table.from_pydict(cols, schema=schema)


def write_samples(shard_dir: Path, ss: ShardSet, index: SampleIndex, name: str = SAMPLES) -> dict:
    """Write the index atomically into ``shard_dir``; returns the ``"samples"`` entry of
    ``shards.json``."""
    import hashlib

    import pyarrow.parquet as pq

    path = Path(shard_dir) / name
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(samples_table(ss, index), tmp, compression="zstd")
    data = tmp.read_bytes()
    fault_point("shards.samples.tmp")
    replace_fsynced(tmp, path)
    return {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "rows": len(index)}


def parse_samples(data: bytes, ss: ShardSet, source: str) -> SampleIndex:
    """A ``SampleIndex`` from the bytes of a ``samples.parquet``, checked against ``ss`` (``source``
    names it)."""
    import hashlib
    import io

    import numpy as np
    import pyarrow.parquet as pq

    entry = ss.samples or {}
    if entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ShardSetError(f"{source}: its sha256 is not the one {INDEX} records (a stale or "
                            "half-copied index); rebuild it with `tstl shards index`")
    try:
        table = pq.read_table(io.BytesIO(data))
        pos = {s.name: i for i, s in enumerate(ss.shards)}
        shard = np.array([pos[n] for n in table.column("shard").to_pylist()], dtype=np.int32)
        index = SampleIndex(shard, table.column("offset").to_numpy().astype(np.int64),
                            table.column("length").to_numpy().astype(np.int64),
                            table.column("label").to_numpy().astype(np.int64),
                            np.array([k.encode() for k in table.column("key").to_pylist()],
                                     dtype=np.bytes_))
    except (KeyError, ValueError, OSError) as e:
        raise ShardSetError(f"{source}: not a valid {SAMPLES} for this set ({type(e).__name__}: "
                            f"{e}); rebuild it with `tstl shards index`") from e
    if index.counts(len(ss.shards)) != [s.samples for s in ss.shards]:
        raise ShardSetError(f"{source}: its samples per shard differ from {INDEX}; rebuild it with "
                            "`tstl shards index`")
    return index
