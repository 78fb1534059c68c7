"""Frame index sampling: segments (SSV2), dense strides (UCF101), test views, short videos."""

from __future__ import annotations

import numpy as np
import pytest

from tstl.data import sampling


def test_segment_train_one_frame_per_segment() -> None:
    rng = np.random.default_rng(0)
    for n in (16, 17, 50, 161):
        for _ in range(20):
            idx = sampling.segment_train(n, 16, rng)
            avg = n // 16
            assert len(idx) == 16 and np.all(idx // avg == np.arange(16)) and idx.max() < n


def test_segment_train_offsets_are_random() -> None:
    rng = np.random.default_rng(0)
    draws = {tuple(sampling.segment_train(64, 8, rng)) for _ in range(20)}
    assert len(draws) > 1


def test_segment_test_centres_and_two_views() -> None:
    assert sampling.segment_test(32, 8, 0, 1).tolist() == [2, 6, 10, 14, 18, 22, 26, 30]
    assert sampling.segment_test(32, 8, 0, 2).tolist() == [1, 5, 9, 13, 17, 21, 25, 29]
    assert sampling.segment_test(32, 8, 1, 2).tolist() == [3, 7, 11, 15, 19, 23, 27, 31]


def test_dense_train_stride_and_range() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        idx = sampling.dense_train(100, 8, 4, rng)
        assert np.all(np.diff(idx) == 4) and idx[0] >= 0 and idx[-1] < 100
    assert sampling.dense_train(29, 8, 4, rng).tolist() == list(range(0, 29, 4))  # exactly one position fits


def test_dense_test_views_spread() -> None:
    starts = [sampling.dense_test(100, 8, 4, t, 3)[0] for t in range(3)]
    assert starts == [0, 36, 71] and sampling.dense_test(100, 8, 4, 0, 1)[0] == 35


@pytest.mark.parametrize("fn", [
    lambda n: sampling.segment_train(n, 16, np.random.default_rng(0)),
    lambda n: sampling.segment_test(n, 16, 1, 2),
    lambda n: sampling.dense_train(n, 16, 4, np.random.default_rng(0)),
    lambda n: sampling.dense_test(n, 16, 4, 2, 3),
])
def test_short_videos_repeat_frames_in_range(fn) -> None:
    for n in (1, 3, 15, 30):
        idx = fn(n)
        assert len(idx) == 16 and idx.min() >= 0 and idx.max() < n and np.all(np.diff(idx) >= 0)
