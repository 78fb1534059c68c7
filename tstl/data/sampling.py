"""Frame indices of a clip: segment-based (SSV2) and dense with a stride (UCF101/Kinetics), train and test views.

All functions take the number of frames ``n`` the loader trusts (the shard's ``json.frames``, capped by what the
decoder reports) and return ``num_frames`` sorted indices in ``[0, n)``. Videos shorter than the clip repeat
frames instead of failing.
"""

from __future__ import annotations

import numpy as np


def _spread(n: int, num_frames: int) -> np.ndarray:
    """``num_frames`` indices spread evenly over a video too short for the requested sampling."""
    return np.floor(np.arange(num_frames) * n / num_frames).astype(np.int64)


def segment_train(n: int, num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """One random frame from each of ``num_frames`` equal segments (TSN / SSV2 training)."""
    if n < 1:
        raise ValueError("video has no frames")
    avg = n // num_frames
    if avg == 0:
        return _spread(n, num_frames)
    return np.arange(num_frames) * avg + rng.integers(0, avg, size=num_frames)


def segment_test(n: int, num_frames: int, view: int, num_views: int) -> np.ndarray:
    """Deterministic segment sampling; view ``t`` of ``T`` takes offset ``(t + 0.5) / T`` inside every segment.

    One view gives the segment centres; two give the 1/4 and 3/4 points.
    """
    if n < 1:
        raise ValueError("video has no frames")
    tick = n / num_frames
    idx = np.floor(np.arange(num_frames) * tick + tick * (view + 0.5) / num_views).astype(np.int64)
    return np.clip(idx, 0, n - 1)


def dense_train(n: int, num_frames: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """``num_frames`` frames ``rate`` apart from a random start; short videos are spread evenly."""
    if n < 1:
        raise ValueError("video has no frames")
    span = (num_frames - 1) * rate + 1
    if n < span:
        return _spread(n, num_frames)
    start = int(rng.integers(0, n - span + 1))
    return start + np.arange(num_frames) * rate


def dense_test(n: int, num_frames: int, rate: int, view: int, num_views: int) -> np.ndarray:
    """View ``t`` of ``T`` clips whose starts are spread evenly over the video (one view = the centre clip)."""
    if n < 1:
        raise ValueError("video has no frames")
    span = (num_frames - 1) * rate + 1
    if n < span:
        return _spread(n, num_frames)
    room = n - span
    start = room // 2 if num_views == 1 else round(view * room / (num_views - 1))
    return start + np.arange(num_frames) * rate


def train_indices(sampling: str, n: int, num_frames: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Training indices for ``sampling`` = ``segment`` or ``dense``."""
    if sampling == "segment":
        return segment_train(n, num_frames, rng)
    return dense_train(n, num_frames, rate, rng)


def test_indices(sampling: str, n: int, num_frames: int, rate: int, view: int, num_views: int) -> np.ndarray:
    """Evaluation indices of temporal view ``view`` of ``num_views``."""
    if sampling == "segment":
        return segment_test(n, num_frames, view, num_views)
    return dense_test(n, num_frames, rate, view, num_views)
