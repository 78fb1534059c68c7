"""Loader I/O: what an epoch reads, on paper at cluster sizes and counted at a real local http
server.

Planner (no data read): an SSV2-sized shard list -- 168,913 samples of ~600 KB (log-normal sizes,
seeded) in 660 shards of up to 256, 174 classes -- and the loader's own partition
(``tstl.data.partition``) and request planner (``tstl.data.reader.request_bytes``). For every (rank,
step) of an epoch it plans the ranged requests that batch costs and adds them up. The 0.2 loader
(contiguous slots of the epoch per (rank, worker), each shard read from byte 0 up to the slot's last
sample in it) is restated alongside as the baseline.

Server-counted: a small set of SSV2-like clips served over loopback by ``benchmarks.http_counting``
and read by the real loader, bytes counted where the server sends them.

Run: ``python -m benchmarks.loader_io --out docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.report import update_section
from tstl.core.shards import SampleIndex
from tstl.data import partition
from tstl.data.reader import request_bytes

SSV2 = {"samples": 168_913, "shards": 660, "per_shard": 256, "classes": 174, "mean_bytes": 600_000}
LAYOUTS = [(8, 8), (64, 8), (512, 8)]
BATCH = 6
PREFETCH = 2  # DataLoader prefetch_factor (default) ...
AHEAD = 1  # ... plus the batch each worker's prefetch thread reads ahead


def ssv2_index(seed: int = 0) -> SampleIndex:
    """An index shaped like SSV2's train set as ``make shards`` packs it."""
    n, per = SSV2["samples"], SSV2["per_shard"]
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(math.log(SSV2["mean_bytes"]) - 0.125, 0.5, n).astype(np.int64)
    # three members: headers, cls, json, mp4, padding
    length = -(-(sizes + 3 * 512 + 64) // 512) * 512
    shard = np.minimum(np.arange(n) // per, SSV2["shards"] - 1).astype(np.int32)
    offset = np.zeros(n, dtype=np.int64)
    for s in range(SSV2["shards"]):
        rows = np.flatnonzero(shard == s)
        offset[rows] = np.concatenate([[0], np.cumsum(length[rows])[:-1]])
    label = rng.integers(0, SSV2["classes"], n)
    return SampleIndex(shard, offset, length, label, np.array([b""] * n, dtype="S1"))


def _order(ix: SampleIndex, rows: np.ndarray, epoch: int = 0) -> np.ndarray:
    return partition.train_order(ix.shard, rows, SSV2["shards"], seed=1000 + epoch, block=0)


def epoch_reads(ix: SampleIndex, order: np.ndarray, world: int,
                seg: partition.Segment = partition.FRESH,
                drop: bool = False) -> tuple[int, int, float]:
    """(bytes, requests, mean distinct shards per rank batch) of the rest of an epoch from
    ``seg``."""
    n = len(order)
    steps = partition.steps_per_rank(n, world, BATCH, drop)
    total = reqs = 0
    distinct = []
    for step in range(seg.first_step, steps):
        for rank in range(world):
            rows = order[seg.positions(step, rank, world, BATCH) % n]
            r, b = request_bytes(ix, rows)
            reqs, total = reqs + r, total + b
            if step % 97 == 0:
                distinct.append(len(set(ix.shard[rows].tolist())))
    return total, reqs, float(np.mean(distinct)) if distinct else 0.0


def baseline_reads(ix: SampleIndex, order_shards: np.ndarray, slots: int) -> int:
    """The 0.2 loader: slot ``s`` reads positions ``[s L, (s + 1) L)`` of the shards-in-order
    sequence (wrapping: the padding), opening each shard it touches at byte 0 and reading through
    its last sample there."""
    counts = np.bincount(ix.shard, minlength=SSV2["shards"])[order_shards]
    ends = np.cumsum(counts)
    starts = ends - counts
    n = int(ends[-1])
    length = math.ceil(n / (slots * BATCH)) * BATCH
    first = np.searchsorted(ix.shard, np.arange(SSV2["shards"]))  # rows are grouped by shard
    end_of = ix.offset + ix.length
    total = 0
    for slot in range(slots):
        a, b = slot * length, (slot + 1) * length
        while a < b:  # the slot's stretch, cut where the sequence wraps
            lo = a % n
            hi = lo + min(b - a, n - lo)
            for k in np.flatnonzero((starts < hi) & (ends > lo)):
                last = min(hi, ends[k]) - starts[k] - 1  # the slot's last sample of this shard
                total += int(end_of[first[order_shards[k]] + last])
            a += hi - lo
    return total


def planner_table() -> str:
    ix = ssv2_index()
    stored = int(ix.length.sum())
    rows_all = np.arange(len(ix.offset))
    order = _order(ix, rows_all)
    shard_order = np.random.default_rng(7).permutation(SSV2["shards"])
    lines = ["| SSV2 train, 168,913 clips of ~600 KB, 660 shards, batch 6 | " +
             " | ".join(f"{r} GPUs x {w} workers ({r * w} slots)" for r, w in LAYOUTS) + " |",
             "|---|" + "---|" * len(LAYOUTS)]
    cells: dict[str, list[str]] = {k: [] for k in (
        "epoch", "base", "reqs", "mix", "exact", "elastic", "tstl")}
    groups = np.array_split(np.random.default_rng(3).permutation(SSV2["classes"]), 15)
    for world, workers in LAYOUTS:
        read, reqs, mix = epoch_reads(ix, order, world)
        cells["epoch"].append(f"**{read / stored:.3f}**")
        cells["base"].append(f"{baseline_reads(ix, shard_order, world * workers) / stored:.2f}")
        cells["reqs"].append(f"{reqs:,} ({read / reqs / 1e3:.0f} KB)")
        cells["mix"].append(f"{mix:.2f}")
        in_flight = world * workers * (PREFETCH + AHEAD) * BATCH  # prefetched when the job stopped
        cells["exact"].append(f"{in_flight * ix.length.mean() / stored:.3f}")
        # elastic: the resume to fewer ranks, at the middle of the epoch
        to = {8: 4, 64: 56, 512: 504}[world]
        pos = partition.FRESH.consumed(
            partition.steps_per_rank(len(order), world, BATCH, False) // 2, world, BATCH)
        seg = partition.resume_segment(len(order), pos, to, BATCH, False)
        rest_read, _, _ = epoch_reads(ix, order, to, seg)
        cells["elastic"].append(f"{rest_read / int(ix.length[order[pos:]].sum()):.3f} (to {to})")
        ratios = []
        for g in groups[:3]:  # three of the 15 experts (the others are alike)
            rows = np.flatnonzero(np.isin(ix.label, g))
            got, _, _ = epoch_reads(ix, _order(ix, rows), world)
            ratios.append(got / int(ix.length[rows].sum()))
        cells["tstl"].append(f"{np.mean(ratios):.3f}")
    names = {
        "epoch": "bytes read / bytes stored per epoch",
        "base": "the same, 0.2 loader (restated)",
        "reqs": "ranged requests per epoch (mean size)",
        "mix": "distinct shards in a rank's batch of 6",
        "exact": "exact mid-epoch resume: bytes read again / stored (the in-flight batches)",
        "elastic": "elastic resume at mid-epoch: rest-of-epoch bytes read / bytes of the rest",
        "tstl": "TSTL stage 2 (15 groups): expert epoch bytes / the expert's own data",
    }
    lines += [f"| {names[k]} | " + " | ".join(v) + " |" for k, v in cells.items()]
    return "\n".join(lines)


def server_table(videos: int = 24) -> str:
    """The real loader over loopback http: bytes the server sent / bytes it stores."""
    from benchmarks.http_counting import CountingServer
    from benchmarks.loader import make_videos, write_shards
    from tstl.data import DataConfig, build_train_loader

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_videos(Path(tmp) / "v", videos)
        root = write_shards(paths, Path(tmp) / "set", per_shard=videos // 3, repeat=2)
        stored = sum(p.stat().st_size for p in root.glob("*.tar"))
        c = DataConfig(num_frames=8, input_size=112, batch_size=2, num_workers=2, rand_augment="",
                       reprob=0.0, mixup=0.0, cutmix=0.0, cache_dir=str(Path(tmp) / "cache"))
        rows = []
        with CountingServer(root) as srv:
            for r in range(2):  # 2 ranks x 2 workers = 4 slots over 3 shards
                list(build_train_loader(c, srv.url + "/", rank=r, world_size=2))
            first = srv.shard_bytes()
            for r in range(2):
                list(build_train_loader(c, srv.url + "/", rank=r, world_size=2, epoch=1))
            second = srv.shard_bytes() - first
        rows.append("| 2 ranks x 2 workers, 3 shards, epoch 1: bytes sent / stored | "
                    f"{first / stored:.3f} |")
        rows.append(f"| the same, epoch 2 with `data.cache_dir` | {second} bytes |")
    return "| measured at a loopback http server | |\n|---|---|\n" + "\n".join(rows)


NOTES = """\
What an epoch reads. Planner rows: the loader's own partition and request planner over an SSV2-sized
shard list (no data read); the 0.2 row restates the old slot partition (contiguous stretches per
(rank, worker), each shard read from byte 0 through the slot's last sample in it), which reproduces
the figures the issue measured on the old code (1.05 / 1.39 / 4.13). Every sample is one ranged
request of its own bytes, so bytes read per epoch are the bytes of the positions read: the set once,
plus the padding (< world x batch samples). What a resume reads again is the batches that were in
flight: `num_workers x (prefetch_factor + 1)` batches per rank (the DataLoader's queue and each
worker's read-ahead), whatever the data size; an elastic resume reads the rest of the epoch plus the
new layout's padding; a TSTL expert reads its own samples plus padding. Server rows: the real loader
over loopback http, bytes counted where the server sends them."""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="markdown report to update (section 'loader-io')")
    p.add_argument("--videos", type=int, default=24)
    a = p.parse_args(argv)
    text = ("## Loader I/O (`python -m benchmarks.loader_io`)\n\n" + NOTES + "\n\n"
            + planner_table() + "\n\n" + server_table(a.videos) + "\n")
    print(text)
    if a.out:
        update_section(a.out, "loader-io", text)


if __name__ == "__main__":
    main()
