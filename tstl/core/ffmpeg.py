"""Which ffmpeg binary the pipeline runs."""

from __future__ import annotations

import functools
import os
import shutil


@functools.cache
def ffmpeg_exe() -> str:
    """``$FFMPEG`` if set, else the system ``ffmpeg``, else the static binary shipped by
    imageio-ffmpeg.

    The system build is preferred because it is what users expect; the imageio-ffmpeg wheel
    guarantees an ffmpeg with libx264 and libvpx-vp9 on machines where nothing can be installed
    system-wide.
    """
    exe = os.environ.get("FFMPEG") or shutil.which("ffmpeg")
    if exe:
        return exe
    try:
        import imageio_ffmpeg
    except ImportError as e:  # pragma: no cover - imageio-ffmpeg is a declared dependency
        raise RuntimeError("no ffmpeg found: install ffmpeg (apt-get install ffmpeg) "
                           "or set FFMPEG=/path/to/ffmpeg") from e
    return imageio_ffmpeg.get_ffmpeg_exe()
