"""Transcode one video to the training format: H.264, yuv420p, fixed height (or short side), even
other side, no audio, faststart; an item with a segment (an untrimmed Kinetics download) is cut to
it.

The ffmpeg command is built with ffmpeg-python and run as an argument list (never through a shell),
so any file name works; paths are passed with the ``file:`` protocol prefix so a name starting with
``-`` is not an option. Frames are passed through (``-fps_mode passthrough``): no frame is dropped
or duplicated, so frame rate and frame count are those of the source. ``-threads 1`` per job plus
bit-exact flags make the output byte-identical across reruns; parallelism comes from running one
ffmpeg per core.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import ffmpeg

from pipeline.errors import EnvironmentFault, environment_text, is_environment_error
from pipeline.runner import Item
from tstl.core.faults import fault_point
from tstl.core.ffmpeg import ffmpeg_exe

# Bump when the command line changes in a way that changes outputs: every video is then redone.
COMMAND_VERSION = 1
MIN_SOURCE_BYTES = 1024  # smaller files cannot hold a decodable video (VideoMAE skips < 1 KB too)
# Frame geometry a real clip can have: a side under 32 px or an aspect ratio over 8 is a broken or
# bogus header (a 16x2400 source would otherwise become a 2-px-wide "ok" video, a 4000x16 one an
# ffmpeg error).
MIN_SIDE, MAX_ASPECT = 32, 8.0


@dataclass(frozen=True)
class TranscodeParams:
    """Encoder settings; all of them go into the manifest and the skip decision."""

    height: int | None = 240
    crf: int = 23
    preset: str = "veryfast"
    gop: int | None = None  # keyframe interval; None = x264 default
    command_version: int = COMMAND_VERSION
    # set (with height None): scale so the shorter side is this long (Kinetics)
    short_side: int | None = None

    def __post_init__(self) -> None:
        if self.short_side is not None:
            # the short side rule replaces the fixed height
            object.__setattr__(self, "height", None)
        elif self.height is None:
            raise ValueError("TranscodeParams: give height or short_side")

    def as_dict(self) -> dict:
        d = asdict(self)
        # absent for fixed-height outputs: manifests written before it existed match
        if d["short_side"] is None:
            del d["short_side"]
        return d

    def scale(self) -> tuple[str | int, str | int]:
        """The ``scale`` filter's width and height: -2 keeps the aspect ratio with an even side."""
        if self.short_side is None:
            return -2, self.height
        s = self.short_side
        return f"if(lte(iw,ih),{s},-2)", f"if(lte(iw,ih),-2,{s})"


def output_options(p: TranscodeParams) -> dict:
    """ffmpeg output options of every prepared video: H.264 at ``p``'s quality, bit-exact, no audio,
    faststart."""
    opts = {
        "vcodec": "libx264", "preset": p.preset, "crf": p.crf, "pix_fmt": "yuv420p",
        "movflags": "+faststart", "fps_mode": "passthrough", "threads": 1, "map_metadata": -1,
        "fflags": "+bitexact", "flags:v": "+bitexact", "format": "mp4", "an": None, "sn": None,
        "dn": None,
    }
    if p.gop:
        opts["g"] = p.gop
    return opts


GLOBAL_ARGS = ("-nostdin", "-hide_banner", "-loglevel", "error")


def build_command(src: Path, dst: Path, p: TranscodeParams,
                  segment: tuple[float, float] | None = None) -> list[str]:
    """The ffmpeg argv for one transcode (of ``segment`` = (start, end) seconds of the source when
    given)."""
    # input-side -ss/-t: seek, then decode exactly the segment (accurate seek: frames before it are
    # decoded, dropped)
    cut = {"ss": f"{segment[0]:g}", "t": f"{segment[1] - segment[0]:g}"} if segment else {}
    inp = ffmpeg.input(f"file:{src}", **cut)
    video = inp.video.filter("scale", *p.scale())
    out = ffmpeg.output(video, f"file:{dst}", **output_options(p)).global_args(*GLOBAL_ARGS)
    return ffmpeg.compile(out, cmd=ffmpeg_exe(), overwrite_output=True)


@functools.cache
def ffmpeg_version() -> str:
    out = subprocess.run([ffmpeg_exe(), "-version"], capture_output=True, text=True,
                         check=False).stdout
    return out.splitlines()[0] if out else "unknown"


def probe_mp4(path: Path) -> dict:
    """Facts of an MP4 we just wrote, from its index alone: an MP4's moov atom lists every sample,
    so the frame count and duration are exact without reading the packets (this keeps the stage's
    overhead over plain ffmpeg to a header read per video)."""
    with av.open(str(path), metadata_errors="ignore") as c:
        s = c.streams.video[0]
        duration = float(s.duration * s.time_base) if s.duration else 0.0
        return {"frames": s.frames, "duration": duration, **_geometry(s)}


def _geometry(s) -> dict:
    rate = s.average_rate or s.guessed_rate
    return {"fps": float(rate) if rate else 0.0, "width": s.codec_context.width,
            "height": s.codec_context.height}


def read_header(path: Path) -> dict:
    """What the container header announces (no demuxing): duration, frame count (AVI, MP4), stream
    present."""
    with av.open(str(path), metadata_errors="ignore") as c:
        if not c.streams.video:
            raise ValueError("no video stream")
        s = c.streams.video[0]
        return {"header_duration": c.duration / 1e6 if c.duration else None,
                "header_frames": s.frames or None, "width": s.codec_context.width or 0,
                "height": s.codec_context.height or 0}


def geometry_problem(width: int, height: int) -> str | None:
    """Why a source of ``width`` x ``height`` cannot be a usable clip, or None (unknown sizes
    pass)."""
    if not width or not height:
        return None
    if min(width, height) < MIN_SIDE:
        return f"frame size {width}x{height}: a side is under {MIN_SIDE} px"
    if max(width, height) / min(width, height) > MAX_ASPECT:
        return f"frame size {width}x{height}: aspect ratio over {MAX_ASPECT:g}"
    return None


def check_source(path: Path) -> dict:
    """Reject sources that cannot be videos, with a reason a person can act on. Reads the header
    only."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError("zero-byte file")
    if size < MIN_SOURCE_BYTES:
        raise ValueError(f"only {size} bytes: not a complete video")
    try:
        header = read_header(path)
    except (av.error.FFmpegError, ValueError) as e:
        # unreadable for a reason of the machine (permissions), not of the file
        if is_environment_error(e):
            raise EnvironmentFault(f"{path}: {e}") from None
        raise ValueError(f"not a readable video ({e})") from None
    problem = geometry_problem(header["width"], header["height"])
    if problem:
        raise ValueError(f"not a usable video: {problem}")
    return header


def expected_for_segment(src: dict, segment: tuple[float, float]) -> dict:
    """What the output of a cut should hold: the segment's duration (clipped to the source's
    announced length), no frame count (the header counts the whole source)."""
    start, end = segment
    hd = src["header_duration"]
    return {**src, "header_frames": None,
            "header_duration": max(0.0, (min(end, hd) if hd else end) - start)}


def check_complete(src: dict, out: dict) -> None:
    """A cut-off source still announces its full length in its header (frame count in AVI, duration
    in WebM); the frames ffmpeg could decode from it stop early. Raise if the output is clearly
    shorter than announced (for a cut, ``src`` is ``expected_for_segment``: the segment's
    length)."""
    if out["frames"] == 0:
        raise ValueError("no video frames")
    hf, hd = src["header_frames"], src["header_duration"]
    if hf and out["frames"] < 0.9 * hf:
        raise ValueError(f"truncated: {out['frames']} of the {hf} frames the header announces")
    if hd and out["duration"] < 0.9 * hd - 0.2:
        raise ValueError(f"truncated: frames cover {out['duration']:.2f} s of the {hd:.2f} s "
                         "the header announces")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: SIGKILL this ffmpeg when the stage process dies, so a killed stage leaves no orphan
    encoders."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_ffmpeg(argv: list[str], timeout: float, outputs: dict[Path, Path]) -> str | None:
    """Run ffmpeg; None when it succeeded, else the reason (its last lines, the temp names
    ``outputs`` maps shown as the final ones). A full disk or read-only folder raises
    ``EnvironmentFault``; a timeout ``TimeoutExpired``."""
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout,
                              preexec_fn=_die_with_parent)
    except (FileNotFoundError, PermissionError) as e:
        raise EnvironmentFault(f"cannot run ffmpeg '{argv[0]}' ({e.strerror}): install ffmpeg or "
                               "set FFMPEG=/path/to/ffmpeg, then rerun") from None
    # Name the real outputs instead of the random temp names and drop ffmpeg's pointer addresses
    # ("[matroska,webm @ 0x55...]"), so the same failure reads the same on every run.
    text = proc.stderr.decode(errors="replace")
    for tmp, final in outputs.items():
        text = text.replace(str(tmp), str(final))
    env = environment_text(text)
    # A full disk or a read-only folder is not the video's fault; checked whatever the exit
    # status: ffmpeg 5-7 exit 0 when the disk fills while they write the trailer ("Error writing
    # trailer of file:...: No space left on device", measured on a 64 KiB tmpfs), leaving a
    # cut-off temp file.
    if env:
        raise EnvironmentFault(f"ffmpeg writing {', '.join(map(str, outputs.values()))}: {env}")
    if proc.returncode == 0:
        return None
    err = re.sub(r" @ 0x[0-9a-f]+", "", text).strip().splitlines()
    return f"ffmpeg exit {proc.returncode}: {' | '.join(err[-3:])}"


def disk_full(folder: Path, min_free: int = 1 << 20) -> bool:
    """Whether the filesystem of ``folder`` has less than ``min_free`` bytes left for us (a last
    line of defence for an ffmpeg that reports a write error in words we do not know: its cut-off
    output is still on the disk)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < min_free


def tmp_name(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.tmp-{os.getpid()}-{os.urandom(3).hex()}")


def clear_stale_tmp(dst: Path) -> None:
    """Remove temp files a killed run left for this output (only this item's, so parallel parts
    never clash)."""
    for stale in dst.parent.glob(f".{dst.name}.tmp-*"):
        stale.unlink(missing_ok=True)


def transcode(item: Item, params: TranscodeParams, timeout: float) -> dict:
    """Transcode ``item.source`` to ``item.output``; returns the manifest fields (status, error,
    stream facts)."""
    try:
        src_info = check_source(item.source)
    except ValueError as e:
        return {"status": "failed", "error": str(e)}
    if item.segment:
        src_info = expected_for_segment(src_info, item.segment)
        if src_info["header_duration"] <= 0:
            return {"status": "failed",
                    "error": f"segment {item.segment[0]:g}-{item.segment[1]:g} s starts after "
                                                 "the end of the source"}
    item.output.parent.mkdir(parents=True, exist_ok=True)
    clear_stale_tmp(item.output)
    tmp = tmp_name(item.output)
    argv = build_command(item.source, tmp, params, item.segment)
    try:
        error = run_ffmpeg(argv, timeout, {tmp: item.output})
        if error:
            return {"status": "failed", "error": error}
        try:
            out = probe_mp4(tmp)
            check_complete(src_info, out)
        except ValueError as e:  # our own output unreadable or short: a full disk is to blame
            if disk_full(tmp.parent):
                raise EnvironmentFault(f"{item.output}: no space left on device while writing it "
                                       f"({e})") from e
            raise
        fault_point("rename:video")
        os.replace(tmp, item.output)
    except ValueError as e:
        return {"status": "failed", "error": str(e)}
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"ffmpeg took longer than {timeout:.0f} s"}
    finally:
        tmp.unlink(missing_ok=True)
    return {"status": "ok", "error": None, "source_frames": src_info["header_frames"],
            "ffmpeg": ffmpeg_version(),
            **{k: out[k] for k in ("frames", "fps", "width", "height", "duration")}}
