"""Loader benchmark: training-clip throughput from shards vs a per-file loader vs decoding alone.

All three read the same SSV2-like videos (428x240 H.264, 12 fps, 4 s) with 16-frame segment sampling at 224 px:

* ``shards``: ``build_train_loader`` (tar stream -> shuffle buffer -> decord from memory -> our augmentation);
* ``per-file``: a map-style dataset that opens every mp4 by path with ``decord.VideoReader(path, num_threads=1)``
  and augments the CAST/VideoMAE way (RandAugment on native-size frames, normalise, then crop and resize);
* ``decode-only``: decord on the same bytes and frame indices, nothing else, in one process.

Run: ``python -m benchmarks.loader --out docs/benchmarks.md [--videos 64] [--workers 1]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import random
import subprocess
import tempfile
import time
from pathlib import Path

import decord
import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from timm.data import rand_augment_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from tstl.core import shards as shard_format
from tstl.core.ffmpeg import ffmpeg_exe
from benchmarks.report import update_section
from tstl.data import DataConfig, build_train_loader, sampling
from tstl.data.transforms import TrainClipTransform, normalize, seeded
from tstl.core.log import init_logging

logger = logging.getLogger(__name__)

FRAMES = 48


def make_videos(root: Path, n: int) -> list[Path]:
    """``n`` distinct SSV2-like mp4s (as `make prepare-ssv2` writes them: libx264 veryfast, crf 23)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in tqdm(range(n), desc="videos", leave=False):
        p = root / f"{i}.mp4"
        subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=428x240:rate=12",
                        "-vf", f"hue=h={i * 13 % 360}", "-frames:v", str(FRAMES), "-c:v", "libx264",
                        "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p", "-y", str(p)], check=True)
        paths.append(p)
    return paths


def write_shards(paths: list[Path], out: Path, per_shard: int = 16) -> Path:
    """A shard set in the documented format (``tstl.core.shards``) holding the videos."""
    out.mkdir(parents=True, exist_ok=True)
    infos = []
    for s in range(0, len(paths), per_shard):
        name = f"shard-{s // per_shard:06d}.tar"
        hist: dict[int, int] = {}
        with wds.TarWriter(str(out / name), mtime=0) as w:
            for p in paths[s:s + per_shard]:
                label = int(p.stem) % 10
                hist[label] = hist.get(label, 0) + 1
                meta = {"id": p.stem, "label": label, "frames": FRAMES, "fps": 12.0}
                w.write({"__key__": p.stem, shard_format.MP4: p.read_bytes(), shard_format.CLS: str(label).encode(),
                         shard_format.JSON: json.dumps(meta).encode()})
        infos.append(shard_format.ShardInfo(name, len(paths[s:s + per_shard]), (out / name).stat().st_size, "",
                                      dict(sorted(hist.items()))))
    shard_format.save(out, shard_format.ShardSet("bench", "train", [str(c) for c in range(10)], infos))
    return out


class PerFileDataset(Dataset):
    """The CAST/VideoMAE way: open the file by path, decode, RandAugment at native size, then crop."""

    def __init__(self, paths: list[Path], cfg: DataConfig) -> None:
        self.paths, self.cfg = paths, cfg
        self.ra = rand_augment_transform(cfg.rand_augment, {"translate_const": 100, "img_mean": (128, 128, 128)})

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        cfg = self.cfg
        vr = decord.VideoReader(str(self.paths[i]), num_threads=1, ctx=decord.cpu(0))
        idx = sampling.segment_train(len(vr), cfg.num_frames, np.random.default_rng(i))
        vr.seek(0)
        frames = vr.get_batch(list(map(int, idx))).asnumpy()
        imgs = [Image.fromarray(f) for f in frames]
        state = random.getstate(), np.random.get_state()
        out = []
        for img in imgs:
            random.setstate(state[0])
            np.random.set_state(state[1])
            out.append(np.asarray(self.ra(img)))
        clip = normalize(torch.from_numpy(np.stack(out)), cfg.mean, cfg.std)  # [3, T, H, W] at native size
        top, left, h, w = RandomResizedCropAndInterpolation.get_params(imgs[0], cfg.rrc_scale, cfg.rrc_ratio)
        crop = clip[:, :, top:top + h, left:left + w]
        clip = F.interpolate(crop, size=(cfg.input_size, cfg.input_size), mode="bilinear", align_corners=False)
        return clip, int(self.paths[i].stem) % 10


def _rate(it, n_clips: int, desc: str) -> float:
    """Steady-state clips per second: the clock starts at the first batch (worker start-up is not counted)."""
    start, seen, total = 0.0, 0, 0
    for batch in tqdm(it, desc=desc, leave=False):
        size = len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch["key"])
        total += size
        if not start:
            start = time.perf_counter()
            continue
        seen += size
    assert total >= n_clips * 0.9 and seen, f"{desc}: only {total} clips of {n_clips}"
    return seen / (time.perf_counter() - start)


def breakdown(paths: list[Path], cfg: DataConfig, n: int) -> dict[str, float]:
    """Milliseconds per clip spent in each stage, measured in one process."""
    tf, times = TrainClipTransform(cfg), {"read": 0.0, "decode": 0.0, "augment": 0.0, "collate": 0.0}
    rng = np.random.default_rng(0)
    for p in paths[:n]:
        t0 = time.perf_counter()
        data = p.read_bytes()
        t1 = time.perf_counter()
        vr = decord.VideoReader(io.BytesIO(data), num_threads=1)
        frames = vr.get_batch(list(map(int, sampling.segment_train(FRAMES, cfg.num_frames, rng)))).asnumpy()
        t2 = time.perf_counter()
        with seeded(int(p.stem)):
            clip = tf(frames)
        t3 = time.perf_counter()
        torch.stack([clip] * cfg.batch_size)
        t4 = time.perf_counter()
        for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, (t4 - t3) / cfg.batch_size)):
            times[k] += dt * 1000 / n
    return times


def decode_only(paths: list[Path], cfg: DataConfig) -> float:
    """Clips per second of decord on the same bytes and indices, nothing else."""
    blobs = [p.read_bytes() for p in paths]
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for data in tqdm(blobs, desc="decode-only", leave=False):
        vr = decord.VideoReader(io.BytesIO(data), num_threads=1)
        vr.get_batch(list(map(int, sampling.segment_train(FRAMES, cfg.num_frames, rng)))).asnumpy()
    return len(blobs) / (time.perf_counter() - start)


def run(num_videos: int, workers: int) -> str:
    """Run the three loaders and return the markdown section."""
    cfg = DataConfig(num_frames=16, input_size=224, sampling="segment", flip=False, batch_size=8,
                     num_workers=workers, shuffle_buffer=16, mixup=0.8, cutmix=1.0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_videos(Path(tmp) / "videos", num_videos)
        shard_dir = write_shards(paths, Path(tmp) / "shards")
        torch.set_num_threads(1)
        decode_only(paths[:4], cfg)  # warm the page cache and decord
        shards = _rate(build_train_loader(cfg, shard_dir), num_videos, "shards")
        light = dataclasses.replace(cfg, rand_augment="", reprob=0.0, mixup=0.0, cutmix=0.0)
        shards_light = _rate(build_train_loader(light, shard_dir), num_videos, "shards, crop only")
        per_file_dl = DataLoader(PerFileDataset(paths, cfg), batch_size=cfg.batch_size, shuffle=True,
                                 num_workers=workers, drop_last=True)
        per_file = _rate(per_file_dl, num_videos - cfg.batch_size, "per-file")
        dec = decode_only(paths, cfg)
        parts = breakdown(paths, cfg, min(num_videos, 24))
    total = sum(parts.values())
    w = max(1, workers)
    rows = "\n".join(f"| {k} | {v:.1f} | {100 * v / total:.0f} % |" for k, v in parts.items())
    return f"""## Loader (`python -m benchmarks.loader --videos {num_videos} --workers {workers}`)

{num_videos} SSV2-like videos (428x240 H.264 veryfast crf 23, 12 fps, {FRAMES} frames), training clips of 16
frames at 224 px, segment sampling, full augmentation (random resized crop, RandAugment m7 n4, random erasing
0.25, mixup/cutmix), batch 8, {workers} worker(s); clips per second per worker, measured on a CPU machine.

| loader | clips/s per worker | vs per-file | vs decode-only |
|---|---|---|---|
| shards (`tstl.data`) | {shards / w:.1f} | {shards / per_file:.2f}x | {shards / w / dec:.2f} |
| shards, crop + normalise only (no RandAugment/erasing/mixup) | {shards_light / w:.1f} | | {shards_light / w / dec:.2f} |
| per-file decord (CAST/VideoMAE style) | {per_file / w:.1f} | 1.00x | {per_file / w / dec:.2f} |
| decode only (same bytes and frames, 1 process) | {dec:.1f} | | 1.00 |

Where the time of one shard-loader clip goes (one process, ms per clip):

| stage | ms | share |
|---|---|---|
{rows}

Reading: the shard stream itself costs little (read {parts["read"]:.1f} ms; with only crop and normalisation the
shard loader runs at {shards_light / w / dec:.2f} of the decode-only rate). The full CAST augmentation costs
{parts["augment"]:.0f} ms per clip — mostly timm RandAugment's PIL affine ops (rotate/shear/translate), run on 16
frames — which is more than decoding, so no loader doing that augmentation on the CPU can reach 0.8 of the
decode-only rate. The crop-only row isolates the loader: what separates it from decoding alone is resizing 16
crops to 224 px, converting to normalised float and handing 9.6 MB per clip to the training process. Against the per-file loader the
shard loader gains by running RandAugment on the 224 px crop instead of the native frame and by avoiding a file
open per clip; on a local page-cached disk the latter is small, on network storage it is what dominates the
per-file loader. Figures vary with the load of the (shared) machine; compare rows of one run only.
"""


def main(argv: list[str] | None = None) -> None:
    """CLI: run the loader benchmark and write its section of the report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/benchmarks.md", help="report file whose 'loader' section is replaced")
    ap.add_argument("--videos", type=int, default=64, help="number of videos (size knob; 16 is a quick run)")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers for both loaders")
    args = ap.parse_args(argv)
    init_logging()
    md = run(args.videos, args.workers)
    update_section(args.out, "loader", md)
    print(md)


if __name__ == "__main__":
    main()
