"""Worker-side transforms: one draw per clip, uint8 out, SSV2 never flips, eval crops cover the long
side; and the loader's batch format and ``augment_on`` paths."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tstl.data import DataConfig, build_eval_loader, build_train_loader
from tstl.data.device import DeviceRandAugment, MixupCutmix, Normalize
from tstl.data.transforms import EvalViews, TrainClipTransform, rrc_params


def _textured(t: int = 6, h: int = 48, w: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return np.repeat(frame[None], t, axis=0)


def _half_white(t: int = 4, h: int = 48, w: int = 64) -> np.ndarray:
    frames = np.zeros((t, h, w, 3), dtype=np.uint8)
    frames[:, :, : w // 2] = 255
    return frames


@pytest.mark.parametrize("augment", [True, False])
def test_same_augmentation_on_every_frame(augment: bool) -> None:
    cfg = DataConfig(input_size=32, rand_augment="rand-m9-n4-mstd0.5-inc1")
    tf = TrainClipTransform(cfg, augment=augment)
    outs = []
    for seed in range(8):
        clip = tf(_textured(), np.random.default_rng(seed))
        assert clip.shape == (6, 32, 32, 3) and clip.dtype == torch.uint8
        # identical input frames stay identical
        assert all(torch.equal(clip[t], clip[0]) for t in range(6))
        # reproducible from the generator
        assert torch.equal(clip, tf(_textured(), np.random.default_rng(seed)))
        outs.append(clip)
    assert not all(torch.equal(outs[0], o) for o in outs[1:])  # draws differ between clips


def test_rrc_params_follow_timm_ranges() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = rrc_params(240, 428, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top <= 240 - h and 0 <= left <= 428 - w
        assert 0.07 <= h * w / (240 * 428) <= 1.0


def _left_brighter(cfg: DataConfig, seeds: range) -> list[bool]:
    tf = TrainClipTransform(cfg)
    out = []
    for seed in seeds:
        clip = tf(_half_white(), np.random.default_rng(seed)).float()
        out.append(bool(clip[:, :, :16].mean() > clip[:, :, 16:].mean()))
    return out


def test_ssv2_never_flips_ucf_sometimes_does() -> None:
    plain = dict(input_size=32, rand_augment="", reprob=0.0, rrc_scale=(1.0, 1.0),
                 rrc_ratio=(4 / 3, 4 / 3))
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
    assert left.shape == (2, 32, 32, 3) and left.dtype == torch.uint8
    assert left.float().mean() > centre.float().mean() > right.float().mean()
    assert torch.equal(ev.crop(x, 1), EvalViews(cfg, num_crops=1).crop(x, 0))


# ---- the loader: uint8 across the worker boundary, batch stages, augment_on ----------------------
LOADER = dict(num_frames=4, input_size=32, batch_size=2, eval_batch_size=4, num_workers=1,
              min_bad_check=1000)


def test_workers_hand_uint8_and_the_stages_make_float(shardset: Callable[..., Path]) -> None:
    root = shardset(8, [8])
    ld = build_train_loader(DataConfig(**LOADER, mixup=0.0, cutmix=0.0), root)
    ld._stages = lambda: []  # what the workers hand over
    raw = next(iter(ld))
    assert raw["video"].dtype == torch.uint8 and raw["video"].shape == (2, 4, 32, 32, 3)
    out = next(iter(build_train_loader(DataConfig(**LOADER, mixup=0.0, cutmix=0.0), root)))
    assert out["video"].dtype == torch.float32 and out["video"].shape == (2, 3, 4, 32, 32)
    expect = Normalize(DataConfig().mean, DataConfig().std)({"video": raw["video"]}, 0)["video"]
    no_erase = build_train_loader(DataConfig(**LOADER, mixup=0.0, cutmix=0.0, reprob=0.0), root)
    assert torch.allclose(next(iter(no_erase))["video"], expect)
    ev = next(iter(build_eval_loader(DataConfig(**LOADER), root)))
    assert ev["video"].dtype == torch.float32 and ev["video"].shape == (4, 3, 4, 32, 32)


def test_augment_on_resolution_and_stages(shardset: Callable[..., Path]) -> None:
    root = shardset(8, [8])
    ld = build_train_loader(DataConfig(**LOADER), root)
    assert ld.augment_on == "worker"  # auto on the CPU
    assert not any(isinstance(s, DeviceRandAugment) for s in ld._stages())
    assert isinstance(ld._stages()[-1], MixupCutmix)
    ld.device = torch.device("cuda")  # only resolved, never used here
    assert ld.augment_on == "device" and any(isinstance(s, DeviceRandAugment) for s in ld._stages())
    assert (build_train_loader(DataConfig(**LOADER, augment_on="worker"), root).to("cpu").augment_on
            == "worker")
    with pytest.raises(ValueError, match="augment_on"):
        DataConfig(augment_on="gpu")  # type: ignore[arg-type]


@pytest.mark.parametrize("where", ["worker", "device"])
def test_both_paths_reproducible_same_format_and_range(shardset: Callable[..., Path],
                                                       where: str) -> None:
    root = shardset(8, [4, 4])
    c = DataConfig(**LOADER, augment_on=where)
    a = list(build_train_loader(c, root, epoch=1))
    b = list(build_train_loader(c, root, epoch=1))
    assert len(a) == len(b) == 4
    assert all(torch.equal(x["video"], y["video"]) and torch.equal(x["label"], y["label"])
               for x, y in zip(a, b))
    other = DataConfig(**LOADER, augment_on="worker" if where == "device" else "device")
    o = list(build_train_loader(other, root, epoch=1))
    assert [x["key"] for x in a] == [x["key"] for x in o]  # same clips, augmented in another place
    for x, y in zip(a, o):
        assert (x["video"].shape == y["video"].shape == (2, 3, 4, 32, 32)
                and x["label"].shape == y["label"].shape)
    # normalised uint8 range (outside erased boxes)
    lo, hi = (-0.485 / 0.229 - 1e-4, (1 - 0.406) / 0.225 + 1e-4)
    for x in a:
        v = x["video"]
        assert v.min() >= -6 and v.max() <= 6 and ((v >= lo) & (v <= hi)).float().mean() > 0.5


def test_pure_scale_shrinks_antialiased_and_flips_exactly():
    """A crop that is only scaled (and maybe flipped) is one area-averaged resize: a 1-px
    checkerboard shrunk 7.5x comes out flat grey (bilinear alone aliases it into stripes), and the
    flipped clip is the mirror image."""
    from tstl.data.augment import crop_matrix
    from tstl.data.transforms import flip_matrix, warp_clip

    yy, xx = np.mgrid[:240, :240]
    frames = np.repeat((((yy + xx) % 2) * 255).astype(np.uint8)[None, :, :, None], 3,
                       axis=3).repeat(2, axis=0)
    m = crop_matrix(240, 240, 32)
    out = warp_clip(frames, (0, 0, 240, 240), m, 32)
    assert (out.shape == (2, 32, 32, 3) and abs(float(out.mean()) - 127.5) < 2
            and float(out.std()) < 3)
    ramp = np.repeat(np.tile(np.arange(240, dtype=np.uint8), (240, 1))[None, :, :, None], 3, axis=3)
    plain = warp_clip(ramp, (0, 0, 240, 240), m, 32)
    flipped = warp_clip(ramp, (0, 0, 240, 240), m @ flip_matrix(32), 32)
    assert np.array_equal(flipped, plain[:, :, ::-1])


@pytest.mark.parametrize("box", [(0, 0, 240, 320), (17, 40, 150, 201), (5, 3, 230, 420)])
def test_crop_resize_is_the_reference_bilinear(box):
    """With no geometric op the crop box is resized as the reference does it: CAST
    ``util_tools/video_transforms.py`` lines 540-572 (``random_resized_crop``) crop then
    ``F.interpolate(mode="bilinear", align_corners=False)`` to 224. OpenCV's fixed-point bilinear
    rounds where torch keeps floats: within 1 grey level everywhere."""
    import torch.nn.functional as F

    from tstl.data.augment import crop_matrix
    from tstl.data.transforms import warp_clip

    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, size=(2, 240, 428, 3), dtype=np.uint8)
    top, left, h, w = box
    ours = warp_clip(frames, box, crop_matrix(w, h, 224), 224).astype(np.int16)
    crop = torch.from_numpy(frames[:, top:top + h, left:left + w]).permute(0, 3, 1, 2).float()
    ref = F.interpolate(crop, size=(224, 224), mode="bilinear", align_corners=False)
    ref = ref.round().clamp(0, 255).permute(0, 2, 3, 1).numpy().astype(np.int16)
    assert np.abs(ours - ref).max() <= 1
