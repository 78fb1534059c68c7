"""Decode the sampled frames of one mp4 held in memory with decord, guarded against bad data and hangs."""

from __future__ import annotations

import contextlib
import io
import signal
import threading
from collections.abc import Callable, Iterator

import decord
import numpy as np


class BadSample(Exception):
    """A sample that cannot be used (missing part, undecodable, no frames, decode too slow)."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise ``BadSample`` if the block runs longer than ``seconds`` (main thread of a process only).

    A DataLoader worker runs its loop in its process' main thread, so SIGALRM can interrupt a decoder stuck in a
    broken stream there; elsewhere (threads) the guard is skipped rather than faked.
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


def decode_clip(
    data: bytes,
    json_frames: int,
    pick: Callable[[int], np.ndarray],
    timeout_s: float = 30.0,
) -> np.ndarray:
    """Decode the frames chosen by ``pick(n)`` from mp4 bytes.

    Args:
        data: the mp4 bytes.
        json_frames: the exact frame count recorded at pack time; indices never go beyond it (or beyond what
            the decoder reports, whichever is smaller), so a container lying about its length cannot stall us.
        pick: maps the trusted frame count to the frame indices to read.
        timeout_s: per-clip decode time limit (0 = none).

    Returns:
        uint8 array ``[len(indices), H, W, 3]``.

    Raises:
        BadSample: the bytes do not decode, have no frames, or decoding timed out.
    """
    if len(data) < 1024:
        raise BadSample(f"mp4 has only {len(data)} bytes")
    with _time_limit(timeout_s):
        try:
            reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
            n = min(int(json_frames), len(reader)) if json_frames > 0 else len(reader)
            if n < 1:
                raise BadSample("video has no frames")
            idx = pick(n)
            frames = reader.get_batch(list(map(int, idx))).asnumpy()
        except BadSample:
            raise
        except Exception as e:  # decord raises DECORDError and plain RuntimeErrors for broken streams
            raise BadSample(f"decode failed: {type(e).__name__}: {str(e)[:200]}") from None
    if frames.ndim != 4 or frames.shape[0] != len(idx):
        raise BadSample(f"decoder returned shape {frames.shape} for {len(idx)} frames")
    return frames
