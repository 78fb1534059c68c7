"""Training augmentation is one draw per clip; SSV2 never flips; evaluation crops cover the long side."""

from __future__ import annotations

import numpy as np
import torch

from tstl.data import DataConfig
from tstl.data.transforms import EvalViews, TrainClipTransform, seeded


def _textured(t: int = 6, h: int = 48, w: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return np.repeat(frame[None], t, axis=0)


def _half_white(t: int = 4, h: int = 48, w: int = 64) -> np.ndarray:
    frames = np.zeros((t, h, w, 3), dtype=np.uint8)
    frames[:, :, : w // 2] = 255
    return frames


def test_same_augmentation_on_every_frame() -> None:
    cfg = DataConfig(input_size=32, rand_augment="rand-m9-n4-mstd0.5-inc1", reprob=1.0)
    tf = TrainClipTransform(cfg)
    frames = _textured()
    outs = []
    for seed in range(8):
        with seeded(seed):
            clip = tf(frames)
        assert clip.shape == (3, 6, 32, 32)
        for t in range(1, 6):  # identical input frames must stay identical, erasing box included
            same = clip[:, t] == clip[:, 0]
            erased = ~same
            assert same.float().mean() > 0.5
            if erased.any():  # pixel-mode erasing noise differs per frame but only inside one shared box
                rows = erased.any(dim=(0, 2)).nonzero().flatten()
                cols = erased.any(dim=(0, 1)).nonzero().flatten()
                box = torch.zeros(32, 32, dtype=torch.bool)
                box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
                assert not erased.any(0)[~box].any()
        outs.append(clip)
    assert not all(torch.equal(outs[0], o) for o in outs[1:])  # draws differ between clips


def test_same_augmentation_without_erasing_is_exact() -> None:
    cfg = DataConfig(input_size=32, rand_augment="rand-m9-n4-mstd0.5-inc1", reprob=0.0)
    tf = TrainClipTransform(cfg)
    for seed in range(8):
        with seeded(seed):
            clip = tf(_textured())
        assert all(torch.equal(clip[:, t], clip[:, 0]) for t in range(6))


def _left_brighter(cfg: DataConfig, seeds: range) -> list[bool]:
    tf = TrainClipTransform(cfg)
    out = []
    for seed in seeds:
        with seeded(seed):
            clip = tf(_half_white())
        out.append(bool(clip[:, :, :, :16].mean() > clip[:, :, :, 16:].mean()))
    return out


def test_ssv2_never_flips_ucf_sometimes_does() -> None:
    plain = dict(input_size=32, rand_augment="", reprob=0.0, rrc_scale=(1.0, 1.0), rrc_ratio=(4 / 3, 4 / 3))
    assert all(_left_brighter(DataConfig(flip=False, **plain), range(30)))
    flips = _left_brighter(DataConfig(flip=True, **plain), range(30))
    assert 5 < flips.count(False) < 25


def test_eval_crops_short_side_and_positions() -> None:
    cfg = DataConfig(input_size=32)
    ev = EvalViews(cfg, num_crops=3)
    frames = np.zeros((2, 48, 96, 3), dtype=np.uint8)
    frames[:, :, :32] = 255  # white left third after the resize to 32 x 64
    x = ev.resize(frames)
    assert tuple(x.shape) == (2, 3, 32, 64)
    left, centre, right = (ev.crop(x, c) for c in range(3))
    assert left.shape == (3, 2, 32, 32)
    assert left.mean() > centre.mean() > right.mean()
    assert torch.allclose(ev.crop(x, 1), EvalViews(cfg, num_crops=1).crop(x, 0))
