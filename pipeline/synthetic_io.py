"""How the synthetic releases write their files: raw RGB frames encoded with ffmpeg in the codec and
container a release ships, and small text files, each written under a temporary name and renamed.
Shared by ``pipeline.synthetic`` and ``pipeline.synthetic_ek100``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import ffmpeg
import numpy as np

from tstl.core.ffmpeg import ffmpeg_exe


def encode(frames: np.ndarray, path: Path, fps: int | str, codec: str) -> None:
    """Encode raw RGB frames with ffmpeg into ``path`` atomically (temp name, then rename); ``fps``
    may be a rate such as ``"60000/1001"``."""
    _t, h, w, _ = frames.shape
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if codec == "vp9":
        opts = {"vcodec": "libvpx-vp9", "crf": 32, "b:v": 0, "deadline": "realtime", "cpu-used": 8}
        fmt = "webm"
    elif codec == "h264":  # as YouTube downloads (Kinetics) and EPIC-KITCHENS' cameras write it
        opts = {"vcodec": "libx264", "preset": "veryfast", "crf": 26}
        fmt = "mp4"
    else:  # MPEG-4 Part 2 (Xvid-like) in AVI, as UCF101 ships
        opts = {"vcodec": "mpeg4", "q:v": 4, "vtag": "XVID"}
        fmt = "avi"
    stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", framerate=fps)
    stream = ffmpeg.output(stream, str(tmp), format=fmt, pix_fmt="yuv420p", threads=1, an=None,
                           fflags="+bitexact", flags="+bitexact", map_metadata=-1, **opts)
    argv = ffmpeg.compile(stream, cmd=ffmpeg_exe(), overwrite_output=True)
    try:
        proc = subprocess.run(argv, input=frames.tobytes(), capture_output=True, timeout=120)
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace")[-500:]
            raise RuntimeError(f"ffmpeg failed for {path}: {err}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` under a temporary name, then rename (a reader never sees half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
