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
    # exactly one position fits
    assert sampling.dense_train(29, 8, 4, rng).tolist() == list(range(0, 29, 4))


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


# ---------------------------------------------------------------------------- reference conventions
# Hand-computed indices, and verbatim transcriptions of the reference index code (cited) compared
# for every length.


def test_cast_ssv2_test_views_are_segment_starts_and_midpoints() -> None:
    # KHU-VLL/CAST dataset/ssv2.py:248-253 (+ :148-151 buffer[chunk_nb::2]); L=50, T=16, tick 3.125
    assert sampling.cast_segment_test(50, 16, 0, 2).tolist() == [0, 3, 6, 9, 12, 15, 18, 21, 25, 28,
                                                                 31, 34, 37, 40, 43, 46]
    assert sampling.cast_segment_test(50, 16, 1, 2).tolist() == [1, 4, 7, 10, 14, 17, 20, 23, 26,
                                                                 29, 32, 35, 39, 42, 45, 48]
    assert sampling.test_indices("segment", 50, 16, 4, 1, 2, "cast").tolist()[:3] == [1, 4, 7]
    with pytest.raises(ValueError, match="1 or 2 temporal views"):
        sampling.cast_segment_test(50, 16, 2, 3)


def _cast_ssv2_test_reference(n: int, num_segment: int, chunk_nb: int) -> list[int]:
    # verbatim: KHU-VLL/CAST dataset/ssv2.py:248-253 and :151 (test_num_segment = 2)
    tick = n / float(num_segment)
    all_index = list(np.array([int(tick / 2.0 + tick * x) for x in range(num_segment)] +
                              [int(tick * x) for x in range(num_segment)]))
    while len(all_index) < (num_segment * 2):
        all_index.append(all_index[-1])
    all_index = list(np.sort(np.array(all_index)))
    return [int(v) for v in all_index[chunk_nb::2]]


def _cast_dense_test_reference(n: int, clip_len: int, rate: int, chunk_nb: int,
                               test_num_segment: int) -> list[int]:
    # verbatim: KHU-VLL/CAST dataset/kinetics.py:247-249 (decoded frame indices) and :146-151
    # (temporal slice)
    all_index = list(range(0, n, rate))
    while len(all_index) < clip_len:
        all_index.append(all_index[-1])
    temporal_step = max(1.0 * (len(all_index) - clip_len) / (test_num_segment - 1), 0)
    temporal_start = int(chunk_nb * temporal_step)
    return all_index[temporal_start:temporal_start + clip_len]


def _pyslowfast_segment_test_reference(n: int, num_frames: int) -> list[int]:
    # verbatim: facebookresearch/TimeSformer timesformer/datasets/ssv2.py:225-233 (test branch)
    seg_size = float(n - 1) / num_frames
    seq = []
    for i in range(num_frames):
        start = int(np.round(seg_size * i))
        end = int(np.round(seg_size * (i + 1)))
        seq.append((start + end) // 2)
    return seq


def _pyslowfast_dense_reference(n: int, num_frames: int, rate: int, clip_idx: int,
                                num_clips: int) -> list[int]:
    # verbatim: timesformer/datasets/decoder.py:50-58 (get_start_end_idx, clip_idx >= 0) and :24-25
    # (30 fps video)
    import torch

    delta = max(n - rate * num_frames, 0)
    start_idx = delta * clip_idx / num_clips
    end_idx = start_idx + rate * num_frames - 1
    index = torch.linspace(start_idx, end_idx, num_frames)
    return torch.clamp(index, 0, n - 1).long().tolist()


def test_deterministic_rules_equal_the_reference_code_for_every_length() -> None:
    for n in range(1, 400):
        for chunk in (0, 1):
            assert (sampling.cast_segment_test(n, 16, chunk, 2).tolist()
                    == _cast_ssv2_test_reference(n, 16, chunk)), n
    for n in range(1, 400):
        for views in (2, 5):
            for t in range(views):
                assert sampling.cast_dense_test(n, 16, 4, t, views).tolist() == \
                    _cast_dense_test_reference(n, 16, 4, t, views), (n, t, views)
    for n in range(1, 400):
        assert (sampling.pyslowfast_segment(n, 8, None).tolist()
                == _pyslowfast_segment_test_reference(n, 8)), n
    for n in range(8, 400):  # shorter than T: we spread (see pyslowfast_dense_train)
        for t, views in ((0, 1), (1, 3), (2, 3)):
            assert sampling.pyslowfast_dense_test(n, 8, 32, t, views).tolist() == \
                _pyslowfast_dense_reference(n, 8, 32, t, views), (n, t)


def test_cast_dense_train_is_a_linspace_over_the_window() -> None:
    # KHU-VLL/CAST dataset/kinetics.py:255-270: n=65, window 64: end = randint(64, 65) = 64 ->
    # linspace(0, 64, 16) clipped to 63: neighbours 64/15 apart, not exactly 4
    assert sampling.cast_dense_train(65, 16, 4, np.random.default_rng(0)).tolist() == [
        0, 4, 8, 12, 17, 21, 25, 29, 34, 38, 42, 46, 51, 55, 59, 63]
    # n <= 64 (kinetics.py:260-263): linspace(0, 40, 10) clipped to 39, padded with 39
    assert sampling.cast_dense_train(40, 16, 4, np.random.default_rng(0)).tolist() == [
        0, 4, 8, 13, 17, 22, 26, 31, 35, 39, 39, 39, 39, 39, 39, 39]
    rng = np.random.default_rng(3)
    starts = set()
    for _ in range(300):
        idx = sampling.cast_dense_train(100, 16, 4, rng)
        start = int(idx[0])
        starts.add(start)
        # start = end - 64 with end in [64, 99]; the clip is linspace(start, start + 64) clipped to
        # start + 63
        expected = np.clip(np.linspace(start, start + 64, 16), start, start + 63).astype(np.int64)
        assert idx.tolist() == expected.tolist()
    assert min(starts) == 0 and max(starts) == 35


def test_cast_dense_test_views() -> None:
    # n=100, rate 4: 25 decoded frames; 5 views step (25 - 16) / 4 = 2.25 -> starts 0, 2, 4, 6, 9
    # (x4 in frames)
    assert [sampling.cast_dense_test(100, 16, 4, t, 5)[0] for t in range(5)] == [0, 8, 16, 24, 36]
    assert sampling.cast_dense_test(100, 16, 4, 4, 5).tolist() == list(range(36, 100, 4))


def test_tstl_ucf101_rule_one_frame_per_segment() -> None:
    # saddy-paddy/TSTL dataset/kinetics.py:257-271 with clip_len=1, num_segment=16,
    # frame_sample_rate=4 (dataset/datasets.py:169-174): seg = n // 16; offset = randint(4, seg) - 4
    # when seg > 4
    rng = np.random.default_rng(0)
    offsets = set()
    for _ in range(200):
        idx = sampling.tstl_segment_train(100, 16, rng)  # seg 6: offsets in [0, 1]
        offsets |= set((idx - np.arange(16) * 6).tolist())
    assert offsets == {0, 1}
    # seg == rate: offset 0
    assert sampling.tstl_segment_train(64, 16, rng).tolist() == list(range(0, 64, 4))
    # seg 3 < 4: offset seg - 1
    assert sampling.tstl_segment_train(50, 16, rng).tolist() == list(range(2, 50, 3))
    # the tail is never sampled
    assert sampling.train_indices("segment", 100, 16, 4, rng, "tstl").max() < 96
    # test views: middles of 5 equal parts of the training offset range [0, seg - 5] (n=200: seg 12,
    # range 0..7)
    assert [int(sampling.tstl_segment_test(200, 16, t, 5)[0]) for t in range(5)] == [0, 2, 4, 5, 7]


def test_pyslowfast_segments() -> None:
    # facebookresearch/TimeSformer timesformer/datasets/ssv2.py:225-233; n=50, T=8: seg 49/8 =
    # 6.125, bounds [0,6] [6,12] [12,18] [18,24] (round(24.5) = 24, half to even) [24,31] [31,37]
    # [37,43] [43,49]
    assert sampling.pyslowfast_segment(50, 8, None).tolist() == [3, 9, 15, 21, 27, 34, 40, 46]
    bounds = [(0, 6), (6, 12), (12, 18), (18, 24), (24, 31), (31, 37), (37, 43), (43, 49)]
    rng = np.random.default_rng(0)
    seen = [set() for _ in bounds]
    for _ in range(400):
        for i, v in enumerate(sampling.train_indices("segment", 50, 8, 4, rng, "pyslowfast")):
            seen[i].add(int(v))
    assert [(min(s), max(s)) for s in seen] == bounds  # randint(start, end): both ends included


def test_pyslowfast_dense_clips() -> None:
    # timesformer/datasets/decoder.py:50-58 and :24-25: clip_size = 32 * 8 = 256; one test view
    # starts at 0
    assert (sampling.pyslowfast_dense_test(300, 8, 32, 0, 1).tolist()
            == [0, 36, 72, 109, 145, 182, 218, 255])
    assert (sampling.pyslowfast_dense_test(300, 8, 32, 1, 3).tolist()
            == [14, 51, 87, 123, 160, 196, 233, 269])
    # shorter than the clip: delta 0, clamped at the last frame, as the reference
    assert (sampling.pyslowfast_dense_test(100, 8, 32, 0, 1).tolist()
            == [0, 36, 72, 99, 99, 99, 99, 99])
    rng = np.random.default_rng(0)
    starts = [int(sampling.pyslowfast_dense_train(300, 8, 32, rng)[0]) for _ in range(300)]
    assert min(starts) == 0 and max(starts) <= 44 and len(set(starts)) > 20


@pytest.mark.parametrize("convention", ["cast", "tstl", "pyslowfast"])
@pytest.mark.parametrize("sampling_kind", ["segment", "dense"])
def test_conventions_give_valid_indices_for_short_videos(convention: str,
                                                         sampling_kind: str) -> None:
    rng = np.random.default_rng(0)
    views = 2 if convention == "cast" else 3
    for n in (1, 2, 3, 5, 15, 16, 17, 30, 63, 64, 65):
        for idx in [sampling.train_indices(sampling_kind, n, 16, 4, rng, convention)] + \
                   [sampling.test_indices(sampling_kind, n, 16, 4, t, views, convention)
                    for t in range(views)]:
            assert (len(idx) == 16 and idx.min() >= 0 and idx.max() < n
                    and np.all(np.diff(idx) >= 0)), (n, idx)
    with pytest.raises(ValueError, match="unknown sampling convention"):
        sampling.train_indices(sampling_kind, 10, 4, 2, rng, "videomae")
