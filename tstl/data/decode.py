"""Decode the sampled frames of one mp4 held in memory, guarded against bad data and hangs.

Two decoders (``data.decoder``): decord (the default; what CAST/VideoMAE use) and torchcodec
(optional: the PyPI wheels load only with a CUDA build of torch, and need FFmpeg 4-7 shared
libraries on the system). Both decode on the CPU inside the DataLoader workers, one FFmpeg thread
each; NVDEC is not used there, because CUDA does not survive the fork that starts the workers.
"""

from __future__ import annotations

import contextlib
import io
import signal
import threading
from collections.abc import Callable, Iterator

import decord
import numpy as np

TORCHCODEC_FIX = ("data.decoder=torchcodec needs the torchcodec package (pip install torchcodec), "
                  "a CUDA build of torch (its PyPI wheels link CUDA libraries even for CPU "
                  "decoding) and FFmpeg 4-7 shared libraries (apt install ffmpeg); or use "
                  "data.decoder=decord")


def check_decoder(name: str) -> None:
    """Raise ``RuntimeError`` naming the fix when decoder ``name`` cannot be used in this
    environment."""
    if name not in DECODERS:
        raise ValueError(f"data.decoder must be one of {', '.join(DECODERS)}, got {name!r}")
    if name == "torchcodec":
        try:
            from torchcodec.decoders import VideoDecoder  # noqa: F401
        except (ImportError, OSError, RuntimeError) as e:
            raise RuntimeError(f"{TORCHCODEC_FIX} ({type(e).__name__}: {str(e)[:200]})") from None


def decoder_available(name: str) -> bool:
    """Whether decoder ``name`` loads here (``check_decoder`` without the error)."""
    try:
        check_decoder(name)
    except RuntimeError:
        return False
    return True


class BadSample(Exception):
    """A sample that cannot be used (missing part, undecodable, no frames, decode too slow)."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise ``BadSample`` if the block runs longer than ``seconds`` (main thread of a process
    only).

    A DataLoader worker runs its loop in its process' main thread, so SIGALRM can interrupt a
    decoder stuck in a broken stream there; elsewhere (threads) the guard is skipped rather than
    faked.
    """
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: object) -> None:
        raise BadSample(f"decode took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


Frames = Callable[[list[int]], np.ndarray]


def _decord(data: bytes) -> tuple[int, Frames]:
    reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
    return len(reader), lambda idx: reader.get_batch(idx).asnumpy()


def _torchcodec(data: bytes) -> tuple[int, Frames]:
    from torchcodec.decoders import VideoDecoder

    # exact mode scans the packets once: the frame count and the index -> frame mapping do not rely
    # on the header
    reader = VideoDecoder(data, seek_mode="exact", num_ffmpeg_threads=1, dimension_order="NHWC",
                          device="cpu")
    return len(reader), lambda idx: reader.get_frames_at(idx).data.numpy()


_OPENERS = {"decord": _decord, "torchcodec": _torchcodec}
"""Decoder name -> open mp4 bytes: (frames the decoder reports, read frames at indices as uint8
NHWC)."""
DECODERS = tuple(_OPENERS)


def decode_clip(
    data: bytes,
    json_frames: int,
    pick: Callable[[int], np.ndarray],
    timeout_s: float = 30.0,
    decoder: str = "decord",
) -> np.ndarray:
    """Decode the frames chosen by ``pick(n)`` from mp4 bytes.

    Args:
        data: the mp4 bytes.
        json_frames: the exact frame count recorded at pack time; indices never go beyond it (or
            beyond what the decoder reports, whichever is smaller), so a container lying about its
            length cannot stall us.
        pick: maps the trusted frame count to the frame indices to read.
        timeout_s: per-clip decode time limit (0 = none).
        decoder: ``decord`` or ``torchcodec`` (``check_decoder`` says whether it can run here).

    Returns:
        uint8 array ``[len(indices), H, W, 3]``.

    Raises:
        BadSample: the bytes do not decode, have no frames, or decoding timed out.
    """
    if len(data) < 1024:
        raise BadSample(f"mp4 has only {len(data)} bytes")
    with _time_limit(timeout_s):
        try:
            reported, read = _OPENERS[decoder](data)
            n = min(int(json_frames), reported) if json_frames > 0 else reported
            if n < 1:
                raise BadSample("video has no frames")
            idx = pick(n)
            frames = read(list(map(int, idx)))
        except BadSample:
            raise
        except Exception as e:
            # DECORDError, plain RuntimeErrors and (torchcodec) ValueErrors for broken streams
            raise BadSample(f"decode failed: {type(e).__name__}: {str(e)[:200]}") from None
    if frames.ndim != 4 or frames.shape[0] != len(idx):
        raise BadSample(f"decoder returned shape {frames.shape} for {len(idx)} frames")
    return frames
