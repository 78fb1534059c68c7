"""Fixtures: tiny shard sets built in the test."""

from __future__ import annotations

import json
import subprocess
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import webdataset as wds

from tstl.core import shards as fmt
from tstl.core.ffmpeg import ffmpeg_exe

NUM_CLASSES = 5


def make_mp4(path: Path, frames: int, hue: int, size: str = "64x48",
             src: str = "testsrc2") -> bytes:
    """A small H.264 mp4 with exactly ``frames`` frames."""
    subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", f"{src}=size={size}:rate=12",
                    "-vf", f"hue=h={hue}", "-frames:v", str(frames), "-c:v", "libx264", "-pix_fmt",
                    "yuv420p", "-g", "8", "-threads", "1", "-y", str(path)], check=True)
    return path.read_bytes()


def write_shardset(root: Path, samples: list[dict], per_shard: list[int],
                   index: bool = True) -> Path:
    """Write ``samples`` (dicts of ``__key__`` + parts) into shards of the given sizes plus
    ``shards.json`` and, with ``index``, the per-sample index a build writes (without: a set built
    before the index existed)."""
    root.mkdir(parents=True, exist_ok=True)
    assert sum(per_shard) == len(samples)
    shards, i = [], 0
    for s, count in enumerate(per_shard):
        name = f"shard-{s:06d}.tar"
        with wds.TarWriter(str(root / name), mtime=0) as w:
            for sample in samples[i:i + count]:
                w.write(sample)
        shards.append({"name": name, "samples": count, "bytes": (root / name).stat().st_size,
                       "sha256": ""})
        i += count
    meta = {"format": 1, "dataset": "test", "split": "train", "num_samples": len(samples),
            "num_shards": len(shards), "num_classes": NUM_CLASSES,
            "classes": [f"c{k}" for k in range(NUM_CLASSES)], "shards": shards, "missing": [],
            "params": {}}
    if index:
        ss = fmt.parse_index(json.dumps(meta), str(root))
        meta["samples"] = fmt.write_samples(root, ss, fmt.scan_set(root, ss))
    (root / "shards.json").write_text(json.dumps(meta))
    return root


def sample(key: str, label: int, mp4: bytes, frames: int) -> dict:
    """One sample in the shard format."""
    meta = {"id": key, "label": label, "class_name": f"c{label}", "duration": frames / 12,
            "frames": frames, "fps": 12.0, "width": 64, "height": 48, "source": f"{key}.mp4"}
    return {"__key__": key, "cls": str(label).encode(), "json": json.dumps(meta).encode(),
            "mp4": mp4}


@pytest.fixture(scope="session")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[int, bytes]:
    """mp4 bytes by frame count (a short 5-frame one, and 12/20/40 frames)."""
    d = tmp_path_factory.mktemp("mp4")
    return {n: make_mp4(d / f"v{n}.mp4", n, n * 7) for n in (5, 12, 20, 40)}


@pytest.fixture
def shardset(tmp_path: Path, videos: dict[int, bytes]) -> Callable[..., Path]:
    """Factory: ``shardset(n=30, per_shard=[...])`` -> shard-set directory with keys ``v000``..."""

    def build(n: int = 30, per_shard: list[int] | None = None, name: str = "set") -> Path:
        lengths = [12, 20, 40, 5]
        items = [sample(f"v{i:03d}", i % NUM_CLASSES, videos[lengths[i % 4]], lengths[i % 4])
                 for i in range(n)]
        return write_shardset(tmp_path / name, items,
                              per_shard or [n // 3, n // 3, n - 2 * (n // 3)])

    return build


@pytest.fixture
def shardkit() -> types.SimpleNamespace:
    """The sample/shard-set writers for tests that craft their own (bad) samples."""
    return types.SimpleNamespace(sample=sample, write=write_shardset, num_classes=NUM_CLASSES)


def procs_with(marker: str) -> list[int]:
    """Pids of the live processes whose command line holds ``marker`` (to find what a test left)."""
    import contextlib

    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if marker in ((d / "cmdline").read_bytes().replace(b"\0", b" ")
                              .decode(errors="replace")):
                    out.append(int(d.name))
    return out
