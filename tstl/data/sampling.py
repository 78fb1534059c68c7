"""Frame indices of a clip: segment-based (SSV2) and dense with a stride (UCF101/Kinetics), train
and test views.

All functions take the number of frames ``n`` the loader trusts (the shard's ``json.frames``, capped
by what the decoder reports) and return ``num_frames`` sorted indices in ``[0, n)``.

``data.sampling`` picks the family (``segment`` | ``dense``); ``data.sampling_convention`` picks
whose exact index rule is used, because the reference code bases differ in the details:

* ``default``: this project's own rules (TSN training segments; test views at offsets
  ``(t + 0.5) / T`` of every segment; dense clips exactly ``rate`` apart with evenly spread test
  starts).
* ``cast``: CAST/VideoMAE (KHU-VLL/CAST ``dataset/ssv2.py`` and ``dataset/kinetics.py``).
* ``tstl``: TSTL's UCF101 loader (saddy-paddy/TSTL ``dataset/datasets.py`` UCF101 branch:
  ``VideoClsDataset`` with ``clip_len=1, num_segment=16, frame_sample_rate=4``, i.e. one frame per
  segment; see :func:`tstl_segment_train`).
* ``pyslowfast``: facebookresearch/TimeSformer (PySlowFast)
  ``timesformer/datasets/{ssv2,decoder}.py``.

Videos shorter than the clip: where a reference rule still gives valid indices it is followed; where
it degenerates (a single repeated frame, or indices outside the video) the ``default`` spread rule
is used instead, so short videos repeat frames evenly instead of failing. Each function says where
that happens.
"""

from __future__ import annotations

import numpy as np

CONVENTIONS = ("default", "cast", "tstl", "pyslowfast")


def _check(n: int) -> None:
    if n < 1:
        raise ValueError("video has no frames")


def _spread(n: int, num_frames: int) -> np.ndarray:
    """``num_frames`` indices spread evenly over a video too short for the requested sampling."""
    return np.floor(np.arange(num_frames) * n / num_frames).astype(np.int64)


# ----------------------------------------------------------------------------------- default (ours)


def segment_train(n: int, num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """One random frame from each of ``num_frames`` equal segments (TSN / SSV2 training).

    This is CAST's rule too (KHU-VLL/CAST ``dataset/ssv2.py:259-263``: ``k * avg + randint(avg)``,
    ``avg = n // T``). For ``n < T`` CAST returns frame 0 ``T`` times (``ssv2.py:264-267``; its
    ``n > T`` branch there is unreachable); we spread instead.
    """
    _check(n)
    avg = n // num_frames
    if avg == 0:
        return _spread(n, num_frames)
    return np.arange(num_frames) * avg + rng.integers(0, avg, size=num_frames)


def segment_test(n: int, num_frames: int, view: int, num_views: int) -> np.ndarray:
    """Deterministic segment sampling; view ``t`` of ``T`` takes offset ``(t + 0.5) / T`` inside
    every segment.

    One view gives the segment centres; two give the 1/4 and 3/4 points.
    """
    _check(n)
    tick = n / num_frames
    idx = np.floor(np.arange(num_frames) * tick + tick * (view + 0.5) / num_views).astype(np.int64)
    return np.clip(idx, 0, n - 1)


def dense_train(n: int, num_frames: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """``num_frames`` frames ``rate`` apart from a random start; short videos are spread evenly."""
    _check(n)
    span = (num_frames - 1) * rate + 1
    if n < span:
        return _spread(n, num_frames)
    start = int(rng.integers(0, n - span + 1))
    return start + np.arange(num_frames) * rate


def dense_test(n: int, num_frames: int, rate: int, view: int, num_views: int) -> np.ndarray:
    """View ``t`` of ``T`` clips whose starts are spread evenly over the video (one view = the
    centre clip)."""
    _check(n)
    span = (num_frames - 1) * rate + 1
    if n < span:
        return _spread(n, num_frames)
    room = n - span
    start = room // 2 if num_views == 1 else round(view * room / (num_views - 1))
    return start + np.arange(num_frames) * rate


# ---------------------------------------------------------------------------------- CAST / VideoMAE


def cast_segment_test(n: int, num_frames: int, view: int, num_views: int) -> np.ndarray:
    """CAST's SSV2 test views: view 0 = segment starts, view 1 = segment midpoints.

    KHU-VLL/CAST ``dataset/ssv2.py:248-253`` builds ``[int(tick/2 + tick*x)] + [int(tick*x)]``
    (``tick = n / T``), sorts it, and ``ssv2.py:148-151`` takes ``buffer[chunk_nb::2]``: the sorted
    list alternates start, midpoint, so chunk 0 holds the starts and chunk 1 the midpoints. The rule
    is defined for one or two temporal views only (more would take ``buffer[2::2]``, which is not a
    clip); one view is the starts, as CAST's ``buffer[0::2]``.
    """
    _check(n)
    if num_views > 2 or not 0 <= view < num_views:
        raise ValueError(f"CAST's segment test rule has 1 or 2 temporal views, got view {view} of "
                         f"{num_views}")
    tick = n / num_frames
    x = np.arange(num_frames)
    if view == 0:
        return np.array([int(tick * i) for i in x], dtype=np.int64)
    return np.array([int(tick / 2.0 + tick * i) for i in x], dtype=np.int64)


def cast_dense_train(n: int, num_frames: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """CAST/VideoMAE dense training clip: a window of ``T * rate`` frames, ``T`` indices by linspace
    over it.

    KHU-VLL/CAST ``dataset/kinetics.py:255-270`` (``num_segment=1``): ``converted_len = T * rate``;
    for ``n > converted_len``: ``end = randint(converted_len, n)``, ``start = end - converted_len``,
    ``linspace(start, end, T)`` clipped to ``[start, end - 1]`` and truncated, so neighbours are
    ``rate * T / (T - 1)`` apart, not exactly ``rate``. For ``n <= converted_len``
    (``kinetics.py:260-263``): ``linspace(0, n, n // rate)`` padded with ``n`` and clipped to
    ``n - 1``. When ``n < rate`` that is the last frame ``T`` times; we spread instead.
    """
    _check(n)
    conv = num_frames * rate
    if n <= conv:
        k = n // rate
        if k == 0:
            return _spread(n, num_frames)
        idx = np.concatenate((np.linspace(0, n, num=k), np.ones(num_frames - k) * n))
        return np.clip(idx, 0, n - 1).astype(np.int64)
    end = int(rng.integers(conv, n))  # np.random.randint(converted_len, seg_len): high exclusive
    start = end - conv
    return np.clip(np.linspace(start, end, num=num_frames), start, end - 1).astype(np.int64)


def cast_dense_test(n: int, num_frames: int, rate: int, view: int, num_views: int) -> np.ndarray:
    """CAST/VideoMAE dense test view: every ``rate``-th frame, then ``T`` consecutive of those from
    ``int(view * step)``, ``step = max((len - T) / (views - 1), 0)``.

    KHU-VLL/CAST ``dataset/kinetics.py:246-252`` decodes ``range(0, n, rate)`` padded with its last
    entry to ``T`` entries, and ``kinetics.py:146-151`` slices ``[start : start + T]``. With one
    view CAST divides by zero; we take the centre (``(len - T) // 2``).
    """
    _check(n)
    grid = list(range(0, n, rate))
    while len(grid) < num_frames:
        grid.append(grid[-1])
    m = len(grid)
    if num_views == 1:
        start = (m - num_frames) // 2
    else:
        start = int(view * max(1.0 * (m - num_frames) / (num_views - 1), 0))
    return np.asarray(grid[start:start + num_frames], dtype=np.int64)


# ------------------------------------------------------------------------------------ TSTL (UCF101)


def tstl_segment_train(n: int, num_frames: int, rng: np.random.Generator,
                       rate: int = 4) -> np.ndarray:
    """TSTL's UCF101 training indices: one frame per segment of ``n // T`` frames, offset in
    ``[0, seg - rate - 1]``.

    saddy-paddy/TSTL ``dataset/datasets.py:169-176`` builds
    ``VideoClsDataset(clip_len=1, num_segment=16, frame_sample_rate=4)``;
    ``dataset/kinetics.py:257-271`` then gives, per segment ``i`` of ``seg = n // T`` frames:
    ``converted_len = 1 * rate``; if ``seg > rate``: ``end = randint(rate, seg)``,
    ``linspace(end - rate, end, 1) = [end - rate]``, so the offset is uniform in
    ``[0, seg - rate - 1]``; if ``seg == rate``: offset 0; if ``seg < rate``: offset ``seg - 1``;
    plus ``i * seg``. The ``n - T * seg`` tail frames are never sampled. ``seg == 0`` (``n < T``)
    gives index -1 there; we spread instead.
    """
    _check(n)
    seg = n // num_frames
    if seg == 0:
        return _spread(n, num_frames)
    if seg > rate:
        off = rng.integers(rate, seg, size=num_frames) - rate
    elif seg == rate:
        off = np.zeros(num_frames, dtype=np.int64)
    else:
        off = np.full(num_frames, seg - 1, dtype=np.int64)
    return np.arange(num_frames) * seg + off


def tstl_segment_test(n: int, num_frames: int, view: int, num_views: int,
                      rate: int = 4) -> np.ndarray:
    """Deterministic counterpart of :func:`tstl_segment_train` for the test views (TSTL has none
    that works).

    TSTL never runs a test view on UCF101: its UCF101 branch computes ``mode`` but does not pass it
    (``dataset/datasets.py:157-183``), so the val and test sets are built in train mode (random
    frames, one view). Its test branch (``dataset/kinetics.py:248-254`` with ``:146-157``) would
    slice ``clip_len = 1`` frame per view. We keep the training segments and offsets and put view
    ``t`` of ``V`` at the middle of the ``t``-th of ``V`` equal parts of the training offset range
    ``[0, seg - rate - 1]``.
    """
    _check(n)
    seg = n // num_frames
    if seg == 0:
        return _spread(n, num_frames)
    if seg > rate:
        off = int((view + 0.5) * (seg - rate) / num_views)
    elif seg == rate:
        off = 0
    else:
        off = seg - 1
    return np.arange(num_frames) * seg + off


# --------------------------------------------------------------------------------------- PySlowFast


def pyslowfast_segment(n: int, num_frames: int, rng: np.random.Generator | None) -> np.ndarray:
    """TimeSformer's SSV2 rule; ``rng=None`` is the test rule (segment midpoints; every test view is
    the same).

    facebookresearch/TimeSformer ``timesformer/datasets/ssv2.py:225-233``: ``seg = (n - 1) / T``;
    segment ``i`` is ``[round(seg * i), round(seg * (i + 1))]`` (NumPy rounds half to even);
    training draws ``randint(start, end)`` (both ends included), testing takes
    ``(start + end) // 2``. Valid for every ``n >= 1``.
    """
    _check(n)
    seg = float(n - 1) / num_frames
    out = np.empty(num_frames, dtype=np.int64)
    for i in range(num_frames):
        start, end = int(np.round(seg * i)), int(np.round(seg * (i + 1)))
        out[i] = int(rng.integers(start, end + 1)) if rng is not None else (start + end) // 2
    return out


def _pyslowfast_clip(n: int, num_frames: int, rate: int, start: float) -> np.ndarray:
    # timesformer/datasets/decoder.py:57 end = start + clip_size - 1; :24-25 linspace, clamp to
    # [0, n - 1], .long()
    end = start + num_frames * rate - 1
    idx = np.linspace(start, end, num_frames)
    return np.clip(idx, 0, n - 1).astype(np.int64)


def pyslowfast_dense_train(n: int, num_frames: int, rate: int,
                           rng: np.random.Generator) -> np.ndarray:
    """PySlowFast dense training clip: ``clip_size = rate * T``; start
    ``U(0, max(n - clip_size, 0))``; ``T`` indices by linspace from start to
    ``start + clip_size - 1``, clamped to the video.

    facebookresearch/TimeSformer ``timesformer/datasets/decoder.py:50-58`` (``get_start_end_idx``,
    clip_idx -1) and ``:24-25`` (``temporal_sampling``); ``:383`` sets
    ``clip_sz = rate * T / target_fps * fps``: we index the video's own frames (target fps = source
    fps). A video shorter than the clip is clamped at its last frame, as the reference does, except
    when ``n < T`` frames are all that exist: then we spread.
    """
    _check(n)
    if n < num_frames:
        return _spread(n, num_frames)
    delta = max(n - num_frames * rate, 0)
    return _pyslowfast_clip(n, num_frames, rate, float(rng.uniform(0, delta)) if delta > 0 else 0.0)


def pyslowfast_dense_test(n: int, num_frames: int, rate: int, view: int,
                          num_views: int) -> np.ndarray:
    """PySlowFast dense test view ``t`` of ``V``: start ``delta * t / V`` (one view starts at frame
    0).

    facebookresearch/TimeSformer ``timesformer/datasets/decoder.py:50-58`` (clip_idx >= 0) with
    ``num_clips = TEST.NUM_ENSEMBLE_VIEWS`` (``datasets/kinetics.py:221-227``). Short videos as in
    :func:`pyslowfast_dense_train`.
    """
    _check(n)
    if n < num_frames:
        return _spread(n, num_frames)
    delta = max(n - num_frames * rate, 0)
    return _pyslowfast_clip(n, num_frames, rate, delta * view / num_views)


# ----------------------------------------------------------------------------------------- dispatch


def train_indices(sampling: str, n: int, num_frames: int, rate: int, rng: np.random.Generator,
                  convention: str = "default") -> np.ndarray:
    """Training indices for ``sampling`` = ``segment`` or ``dense`` under ``convention`` (see the
    module doc)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown sampling convention {convention!r}; one of "
                         f"{', '.join(CONVENTIONS)}")
    if sampling == "segment":
        if convention == "tstl":
            return tstl_segment_train(n, num_frames, rng, rate)
        if convention == "pyslowfast":
            return pyslowfast_segment(n, num_frames, rng)
        return segment_train(n, num_frames, rng)  # default and cast share the TSN rule
    if convention == "cast":
        return cast_dense_train(n, num_frames, rate, rng)
    if convention == "pyslowfast":
        return pyslowfast_dense_train(n, num_frames, rate, rng)
    return dense_train(n, num_frames, rate, rng)  # default; tstl has no dense rule of its own


def test_indices(sampling: str, n: int, num_frames: int, rate: int, view: int, num_views: int,
                 convention: str = "default") -> np.ndarray:
    """Evaluation indices of temporal view ``view`` of ``num_views`` under ``convention``."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown sampling convention {convention!r}; one of "
                         f"{', '.join(CONVENTIONS)}")
    if sampling == "segment":
        if convention == "cast":
            return cast_segment_test(n, num_frames, view, num_views)
        if convention == "tstl":
            return tstl_segment_test(n, num_frames, view, num_views, rate)
        if convention == "pyslowfast":
            return pyslowfast_segment(n, num_frames, None)
        return segment_test(n, num_frames, view, num_views)
    if convention == "cast":
        return cast_dense_test(n, num_frames, rate, view, num_views)
    if convention == "pyslowfast":
        return pyslowfast_dense_test(n, num_frames, rate, view, num_views)
    return dense_test(n, num_frames, rate, view, num_views)


test_indices.__test__ = False  # a library function, not a pytest test
