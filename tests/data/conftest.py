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


def make_mp4(path: Path, frames: int, hue: int, size: str = "64x48", src: str = "testsrc2") -> bytes:
    """A small H.264 mp4 with exactly ``frames`` frames."""
    subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", f"{src}=size={size}:rate=12",
                    "-vf", f"hue=h={hue}", "-frames:v", str(frames), "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    "-g", "8", "-threads", "1", "-y", str(path)], check=True)
    return path.read_bytes()


def write_shardset(root: Path, samples: list[dict], per_shard: list[int], index: bool = True) -> Path:
    """Write ``samples`` (dicts of ``__key__`` + parts) into shards of the given sizes plus ``shards.json`` and,
    with ``index``, the per-sample index a build writes (without: a set built before the index existed)."""
    root.mkdir(parents=True, exist_ok=True)
    assert sum(per_shard) == len(samples)
    shards, i = [], 0
    for s, count in enumerate(per_shard):
        name = f"shard-{s:06d}.tar"
        with wds.TarWriter(str(root / name), mtime=0) as w:
            for sample in samples[i:i + count]:
                w.write(sample)
        shards.append({"name": name, "samples": count, "bytes": (root / name).stat().st_size, "sha256": ""})
        i += count
    meta = {"format": 1, "dataset": "test", "split": "train", "num_samples": len(samples), "num_shards": len(shards),
            "num_classes": NUM_CLASSES, "classes": [f"c{k}" for k in range(NUM_CLASSES)], "shards": shards,
            "missing": [], "params": {}}
    if index:
        ss = fmt.parse_index(json.dumps(meta), str(root))
        meta["samples"] = fmt.write_samples(root, ss, fmt.scan_set(root, ss))
    (root / "shards.json").write_text(json.dumps(meta))
    return root


def sample(key: str, label: int, mp4: bytes, frames: int) -> dict:
    """One sample in the shard format."""
    meta = {"id": key, "label": label, "class_name": f"c{label}", "duration": frames / 12, "frames": frames,
            "fps": 12.0, "width": 64, "height": 48, "source": f"{key}.mp4"}
    return {"__key__": key, "cls": str(label).encode(), "json": json.dumps(meta).encode(), "mp4": mp4}


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
        items = [sample(f"v{i:03d}", i % NUM_CLASSES, videos[lengths[i % 4]], lengths[i % 4]) for i in range(n)]
        return write_shardset(tmp_path / name, items, per_shard or [n // 3, n // 3, n - 2 * (n // 3)])

    return build


@pytest.fixture
def shardkit() -> types.SimpleNamespace:
    """The sample/shard-set writers for tests that craft their own (bad) samples."""
    return types.SimpleNamespace(sample=sample, write=write_shardset, num_classes=NUM_CLASSES)


class CountingServer:
    """A local http server over a folder that counts the bytes of every body it sends, per path.

    ``ranges``: answer ``Range: bytes=a-b`` with 206 (else the whole file, as ``python -m http.server`` does);
    ``cut``: path -> n, the first answer for that path stops after ``n`` body bytes (a dropped connection).
    """

    def __init__(self, root: Path, ranges: bool = True) -> None:
        import http.server
        import threading

        self.root, self.ranges = root, ranges
        self.sent: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.cut: dict[str, int] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                rng = self.headers.get("Range")
                server.requests.append((path, rng))
                f = server.root / path.lstrip("/")
                if not f.is_file():
                    self.send_error(404)
                    return
                data = f.read_bytes()
                if rng and server.ranges:
                    a, b = (int(x) for x in rng.split("=", 1)[1].split("-"))
                    body = data[a:b + 1]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {a}-{a + len(body) - 1}/{len(data)}")
                else:
                    body = data
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if path in server.cut:
                    body = body[:server.cut.pop(path)]
                    self.close_connection = True
                self.wfile.write(body)
                server.sent[path] = server.sent.get(path, 0) + len(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def shard_bytes(self) -> int:
        """Bytes of ``.tar`` bodies sent so far."""
        return sum(n for p, n in self.sent.items() if p.endswith(".tar"))

    def __enter__(self) -> CountingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve() -> Callable[..., CountingServer]:
    """Factory: ``with serve(folder, ranges=True) as srv: ... srv.url``."""
    return CountingServer
