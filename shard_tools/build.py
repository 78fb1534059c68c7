"""Pack prepared videos and their annotation CSV into a WebDataset shard set, reproducibly and
resumably.

One sample per video: ``<key>.cls`` (label), ``<key>.json`` (id, label, class name, duration, exact
frame count, fps, width, height, source) and ``<key>.mp4`` (the file's bytes, unchanged). Training
splits are shuffled with a seeded RNG before sharding, so shard order and content depend only on the
inputs and the seed. A multi-head dataset (EPIC-KITCHENS: verb and noun) keeps its first head's
label in ``cls`` and every head's in the json's ``labels``; its ``shards.json`` names the heads'
classes and the manifest counts each head's labels.

Shard size: at most ``max_samples`` samples and ``max_bytes`` bytes. By default ``max_samples`` is
``clamp(ceil(N / 128), 8, 256)``: at least 128 shards when the split is large enough (so 16 GPUs x 8
workers all get shards), and never more than 256 videos per shard. SSV2 train (168,913 videos) ->
660 shards of 256; SSV2 val (24,777) -> 128 shards of 194; UCF101 train split 1 (9,537) -> 128
shards of 75; UCF101 test split 1 (3,783) -> 127 shards.

A rerun re-plans the shards, keeps every existing shard whose plan (keys, labels, source sizes and
mtimes) is unchanged and whose sha256 still matches the manifest, and rebuilds the others. The new
set is written beside the old one and switched in with one atomic rename (``shard_tools.publish``):
readers never see old metadata over new tars, and a build killed at any point leaves the previous
set in place.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

from shard_tools.publish import Staging, link_or_copy
from shard_tools.tario import sha256_file, write_tar
from tstl.core import shards
from tstl.core.datasets import DATASETS, SPACE_CSV, CsvFormat, Label, csv_format, get_dataset
from tstl.core.faults import fault_point
from tstl.core.shards import CLS, JSON, LABELS, MP4, ShardInfo, ShardSet

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


class AnnotationError(ValueError):
    """An annotation CSV line is malformed; the message names the file and line."""


@dataclass
class BuildOptions:
    """How to cut a split into shards."""

    seed: int = 0
    max_samples: int | None = None  # None: the default rule in the module docstring
    max_bytes: int = 256 * 2**20
    min_shards: int = 128
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)
    verify_existing: bool = True  # recompute sha256 of existing shards (False: trust size)

    def samples_per_shard(self, n: int) -> int:
        return self.max_samples or min(256, max(8, math.ceil(n / self.min_shards)))


@dataclass(frozen=True)
class Record:
    """One video to pack."""

    key: str
    rel: str
    path: str
    label: Label
    class_name: str
    size: int
    mtime_ns: int

    @property
    def cls(self) -> int:
        """The label the ``cls`` part holds: the only one, or the first head's."""
        return self.label[0] if isinstance(self.label, tuple) else self.label


def sample_key(rel: str) -> str:
    """``Class/v_x_g01.mp4`` -> ``Class_v_x_g01``: webdataset keys may not contain dots (or slashes,
    for us)."""
    return rel.rsplit(".", 1)[0].replace("/", "_").replace(".", "_")


def read_csv(path: Path, fmt: CsvFormat = SPACE_CSV) -> list[tuple[str, Label]]:
    """The (video path, label) lines of an annotation CSV in ``fmt`` (default ``<relative video
    path> <label>``, CAST/VideoMAE's format; EPIC-KITCHENS: ``<narration_id>,<verb>,<noun>``)."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(fmt.parse(line))
        except ValueError as e:
            raise AnnotationError(f"{path}: line {n} '{line}' is {e}") from None
    return out


def read_classes(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _records(rows: list[tuple[str, Label]], videos: Path,
             classes: list[str]) -> tuple[list[Record], list[str]]:
    records, missing, seen = [], [], set()
    for rel, label in rows:
        p = videos / rel
        try:
            st = p.stat()
        except FileNotFoundError:
            missing.append(rel)
            continue
        key = sample_key(rel)
        if key in seen:
            raise AnnotationError(f"two annotation lines map to the sample key '{key}' ({rel})")
        seen.add(key)
        cls = label[0] if isinstance(label, tuple) else label
        name = classes[cls] if 0 <= cls < len(classes) else str(cls)
        records.append(Record(key, rel, str(p), label, name, st.st_size, st.st_mtime_ns))
    return records, missing


def plan_shards(records: list[Record], shuffle: bool, opts: BuildOptions) -> list[list[Record]]:
    """Deterministic assignment of records to shards (seeded shuffle for training splits)."""
    if shuffle:
        order = np.random.default_rng(opts.seed).permutation(len(records))
        records = [records[i] for i in order]
    per_shard = opts.samples_per_shard(len(records))
    shards, current, size = [], [], 0
    for r in records:
        if current and (len(current) >= per_shard or size + r.size > opts.max_bytes):
            shards.append(current)
            current, size = [], 0
        current.append(r)
        size += r.size
    if current:
        shards.append(current)
    return shards


def plan_hash(records: list[Record]) -> str:
    h = hashlib.sha1(f"v{FORMAT_VERSION}".encode())
    for r in records:
        h.update(f"{r.key}\0{r.label}\0{r.size}\0{r.mtime_ns}\0".encode())
    return h.hexdigest()


def probe_bytes(data: bytes) -> dict:
    """Exact frame count (demuxed packets; no decoding), fps, size and duration of an mp4 in
    memory."""
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        frames = sum(1 for pkt in c.demux(s) if pkt.size)
        rate = s.average_rate or s.guessed_rate
        duration = float(s.duration * s.time_base) if s.duration else (c.duration or 0) / 1e6
        return {"frames": frames, "fps": float(rate) if rate else 0.0,
                "width": s.codec_context.width, "height": s.codec_context.height,
                "duration": round(duration, 6)}


Sample = tuple[str, dict[str, bytes]]


def _sample(r: Record, heads: tuple[str, ...] = ()) -> tuple[Sample | None, str | None]:
    data = Path(r.path).read_bytes()
    try:
        meta = probe_bytes(data)
    except Exception as e:  # a file the prepare stage should redo; never a reason to stop packing
        return None, f"{r.rel}: not a readable video ({type(e).__name__}: {e})"
    if meta["frames"] == 0:
        return None, f"{r.rel}: no video frames"
    record = {"id": r.rel.rsplit(".", 1)[0], "label": r.cls, "class_name": r.class_name, **meta,
              "source": r.rel}
    assert set(record) == set(shards.SAMPLE_KEYS)
    if heads:
        record[LABELS] = dict(zip(heads, r.label))  # type: ignore[arg-type]
    parts = {CLS: str(r.cls).encode(), JSON: json.dumps(record, sort_keys=True).encode(), MP4: data}
    return (r.key, parts), None


def write_shard(path: Path, records: list[Record],
                heads: tuple[str, ...] = ()) -> tuple[ShardInfo, list[str]]:
    """Write one shard; unreadable videos are left out and reported. ``heads``: the label heads of
    a multi-head set, in the order of each record's label tuple."""
    samples, bad, hist = [], [], {}
    head_hist: dict[str, dict[int, int]] = {h: {} for h in heads}
    for r in records:
        sample, err = _sample(r, heads)
        if err:
            bad.append(err)
            continue
        samples.append(sample)
        hist[r.cls] = hist.get(r.cls, 0) + 1
        for h, y in zip(heads, r.label if heads else ()):  # type: ignore[arg-type]
            head_hist[h][y] = head_hist[h].get(y, 0) + 1
    size, digest = write_tar(path, samples)
    keys = [k for k, _ in samples]
    info = ShardInfo(path.name, len(samples), size, digest, dict(sorted(hist.items())),
                     plan_hash(records), keys[0] if keys else "", keys[-1] if keys else "",
                     {h: dict(sorted(c.items())) for h, c in head_hist.items()})
    return info, bad


def _still_valid(path: Path, old: ShardInfo | None, phash: str, verify: bool) -> bool:
    if (old is None or old.plan_hash != phash or not path.exists()
            or path.stat().st_size != old.bytes):
        return False
    return not verify or sha256_file(path) == old.sha256


Job = tuple[Path, list[Record], list[tuple[Path, ShardInfo]], bool, tuple[str, ...]]


def _build_one(job: Job) -> tuple[ShardInfo, list[str], bool]:
    """Write shard ``dest`` into the staging folder: a hard link to a still-valid old copy, else
    built anew."""
    dest, records, candidates, verify, heads = job
    phash = plan_hash(records)
    for path, old in candidates:
        if _still_valid(path, old, phash, verify):
            link_or_copy(path, dest)
            fault_point("shards.reuse")
            return old, [], False
    info, bad = write_shard(dest, records, heads)
    return info, bad, True


def build_split(rows: list[tuple[str, Label]], videos: Path, out: Path, *, dataset: str, split: str,
                classes: list[str], shuffle: bool, opts: BuildOptions,
                heads: dict[str, list[str]] | None = None) -> ShardSet:
    """Build (or bring up to date) the shard set of one split at ``out`` (switched in atomically);
    ``heads``: class names per head of a multi-head dataset (labels are tuples in that order)."""
    heads = heads or {}
    records, missing = _records(rows, videos, classes)
    for rel in missing:
        logger.warning("%s/%s: listed in the annotations but not found; left out "
                       "(rerun the prepare stage)",
                       videos, rel)
    plan = plan_shards(records, shuffle, opts)
    names = [f"shard-{i:06d}.tar" for i in range(len(plan))]
    with Staging(out) as stage:
        previous: dict[str, list[tuple[Path, ShardInfo]]] = {}
        for src in stage.sources():  # the visible set last: its copy is tried first
            for s in shards.load(src).shards:
                previous.setdefault(s.name, []).insert(0, (src / s.name, s))
        jobs = [(stage.dir / n, recs, previous.get(n, []), opts.verify_existing, tuple(heads))
                for n, recs in zip(names, plan)]
        infos, bad, rebuilt = [], [], []
        # jobs=1 runs in this process: cheaper for small sets, and a kill takes the whole build
        pool = ProcessPoolExecutor(max_workers=opts.jobs) if opts.jobs > 1 else None
        try:
            results = pool.map(_build_one, jobs) if pool else map(_build_one, jobs)
            for info, errs, built in tqdm(results, total=len(jobs),
                                          desc=f"shards {dataset}/{split}", unit="shard"):
                infos.append(info)
                bad.extend(errs)
                if built:
                    rebuilt.append(info.name)
        finally:
            if pool:
                pool.shutdown()
        for err in bad:
            logger.warning("%s", err)
        ss = ShardSet(dataset, split, classes, infos, missing + bad,
                      {"seed": opts.seed, "shuffled": shuffle,
                       "samples_per_shard": opts.samples_per_shard(len(records)),
                       "max_bytes": opts.max_bytes, "format_version": FORMAT_VERSION}, heads=heads)
        shards.save(stage.dir, ss)
        changed = stage.publish(rebuilt)
    logger.info("%s/%s: %d samples in %d shards (%d rebuilt, %d kept)%s, %d left out -> %s",
                dataset, split, ss.num_samples, len(infos), len(rebuilt), len(infos) - len(rebuilt),
                "" if changed else ", already current", len(ss.missing), out)
    return ss


def dataset_splits(dataset: str, split: int) -> list[str]:
    """The annotation CSVs (stems) that form the shard sets of ``dataset`` for ``--split k`` (the
    registry's rule)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset '{dataset}' (registered: {', '.join(DATASETS)}; use "
                         "--annotations to shard other CSVs)")
    return get_dataset(dataset).shard_splits(split)


def build_dataset(data_dir: Path, dataset: str, split: int, opts: BuildOptions,
                  annotations: list[Path] | None = None,
                  videos: Path | None = None) -> list[ShardSet]:
    """Shard every split of a prepared dataset (or the given annotation CSVs)."""
    root = data_dir / dataset
    videos = videos or root / "videos"
    classes = read_classes(root / "annotations" / "classes.txt")
    heads = {h: read_classes(root / "annotations" / f"{h}_classes.txt") for h in _heads(dataset)}
    csvs = (annotations
            or [root / "annotations" / f"{s}.csv" for s in dataset_splits(dataset, split)])
    sets = []
    for csv in csvs:
        if not csv.exists():
            raise FileNotFoundError(f"{csv} not found: run `make prepare-{dataset}` first "
                                    "(or pass --annotations)")
        name = csv.stem
        sets.append(build_split(read_csv(csv, csv_format(dataset)), videos, root / "shards" / name,
                                dataset=dataset, split=name, classes=classes,
                                shuffle=name.startswith("train"), opts=opts, heads=heads))
    return sets


def _heads(dataset: str) -> tuple[str, ...]:
    """The label heads of a registered multi-head dataset (none for any other folder)."""
    return DATASETS[dataset].heads if dataset in DATASETS else ()
