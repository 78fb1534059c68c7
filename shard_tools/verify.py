"""Verify a shard set: checksums against the manifest, tar integrity, sample parts, and that every
video decodes."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from shard_tools.tario import iter_samples, sha256_file
from tstl.core import shards
from tstl.core.shards import CLS, JSON, MP4, PARTS, ShardInfo

logger = logging.getLogger(__name__)


@dataclass
class ShardReport:
    name: str
    samples: int = 0
    errors: list[str] = field(default_factory=list)


def decode_check(data: bytes, frames: int) -> str | None:
    """Decode first, middle and last frame with decord from memory; None if fine, else the
    problem."""
    import decord

    try:
        vr = decord.VideoReader(io.BytesIO(data), num_threads=1)
        n = len(vr)
        if n < frames:
            return f"decord sees {n} frames, the json says {frames}"
        idx = sorted({0, frames // 2, frames - 1})
        batch = vr.get_batch(idx).asnumpy()
        if batch.shape[0] != len(idx):
            return f"decoded {batch.shape[0]} of {len(idx)} frames"
    except Exception as e:  # decord raises its own DECORDError and RuntimeError
        return f"does not decode ({type(e).__name__}: {e})"
    return None


def verify_shard(path: Path, info: ShardInfo, decode: bool = True) -> ShardReport:
    report = ShardReport(info.name)
    if not path.exists():
        report.errors.append("missing file")
        return report
    if path.stat().st_size != info.bytes:
        report.errors.append(f"size {path.stat().st_size} != manifest {info.bytes}")
    if sha256_file(path) != info.sha256:
        report.errors.append("sha256 does not match the manifest")
    try:
        for key, parts in iter_samples(path):
            report.samples += 1
            if sorted(parts) != sorted(PARTS):
                report.errors.append(f"{key}: parts {sorted(parts)} instead of {list(PARTS)}")
                continue
            meta = json.loads(parts[JSON])
            if int(parts[CLS]) != meta["label"]:
                report.errors.append(f"{key}: .{CLS} {int(parts[CLS])} != json "
                                     f"label {meta['label']}")
            if decode and (err := decode_check(parts[MP4], meta["frames"])):
                report.errors.append(f"{key}: {err}")
    except (tarfile.TarError, ValueError, KeyError, UnicodeDecodeError) as e:
        report.errors.append(f"damaged tar ({type(e).__name__}: {e})")
    if report.samples != info.samples:
        report.errors.append(f"{report.samples} samples, manifest says {info.samples}")
    return report


def _verify(args: tuple[Path, ShardInfo, bool]) -> ShardReport:
    return verify_shard(*args)


def verify(shard_dir: Path, *, decode: bool = True, jobs: int = 1) -> list[ShardReport]:
    """Check every shard of a set; returns one report per shard (errors empty when fine)."""
    # one generation of the set, even if a build switches it meanwhile
    shard_dir = shard_dir.resolve()
    ss = shards.load(shard_dir)
    work = [(shard_dir / s.name, s, decode) for s in ss.shards]
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        reports = list(tqdm(pool.map(_verify, work), total=len(work),
                            desc=f"verify {shard_dir.name}", unit="shard"))
    extra = {p.name for p in shard_dir.glob("shard-*.tar")} - {s.name for s in ss.shards}
    if extra:
        reports.append(ShardReport("(set)",
                                   errors=[f"shards not in the manifest: {sorted(extra)}"]))
    if errors := index_problems(shard_dir, ss):
        reports.append(ShardReport(f"({shards.SAMPLES})", errors=errors))
    return reports


def index_problems(shard_dir: Path, ss: shards.ShardSet) -> list[str]:
    """Whether the per-sample index describes the tars exactly (a missing one is only a warning:
    loaders then index the set at every start)."""
    if ss.samples is None:
        logger.warning("%s has no per-sample index: `tstl shards index %s` adds it "
                       "(loaders read faster)",
                       shard_dir, shard_dir)
        return []
    try:
        saved = shards.parse_samples((shard_dir / ss.samples["name"]).read_bytes(), ss,
                                     str(shard_dir))
        fresh = shards.scan_set(shard_dir, ss)
    except (OSError, shards.ShardSetError) as e:
        return [str(e)]
    same = all((getattr(saved, k) == getattr(fresh, k)).all()
               for k in ("shard", "offset", "length", "label", "key"))
    return ([] if same else ["the index does not match the tars: run `tstl shards index` "
                             "(or rebuild the set)"])
