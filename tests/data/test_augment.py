"""The fused augmentation against timm: each op vs timm's PIL op, the draws vs timm's, worker path
vs device path."""

from __future__ import annotations

import random
from collections import Counter

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import rand_augment_transform
from timm.data.auto_augment import NAME_TO_OP

# imported for its side effect: installs the torchvision shim before timm is imported
from tstl.data import DataConfig  # noqa: F401
from tstl.data.augment import (
    ClipOps,
    RandAugmentPolicy,
    apply_colour,
    colour_numpy,
    colour_torch,
    compose,
    fill_mask,
    op_matrix,
)
from tstl.data.device import DeviceRandAugment, Erase, warp_batch
from tstl.data.transforms import warp_clip

SPEC = "rand-m7-n4-mstd0.5-inc1"


def natural(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    """A natural-image-like frame: smooth colour regions (bicubic-upsampled noise) plus fine
    texture."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3)).astype(np.uint8)
    img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    img += rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


COLOUR = [("Invert", ()), ("Posterize", (1,)), ("Posterize", (2,)), ("Posterize", (4,)),
          ("Solarize", (100,)), ("Solarize", (256,)), ("SolarizeAdd", (77,)),
          ("Brightness", (1.63,)), ("Brightness", (0.4,)), ("Contrast", (1.7,)),
          ("Contrast", (0.3,)), ("Color", (1.8,)), ("Color", (0.2,)), ("Sharpness", (1.9,)),
          ("Sharpness", (0.1,)), ("AutoContrast", ()), ("Equalize", ())]
# NumPy/OpenCV path: cv2.addWeighted rounds where PIL's blend truncates (<= 1 level), and cv2's RGB
# -> grey weights differ from PIL's in the last bit (<= 1 more level for Color). Everything else is
# PIL's integer arithmetic: exact.
NUMPY_TOLERANCE = {"Color": 2, "Sharpness": 1}


@pytest.mark.parametrize("name,args", COLOUR)
def test_colour_ops_match_timm_pil(name: str, args: tuple) -> None:
    # different frames: statistics per frame
    frames = np.stack([natural(seed=1), natural(seed=2) // 2 + 60])
    ref = np.stack([np.asarray(NAME_TO_OP[name](Image.fromarray(f), *args))
                    for f in frames]).astype(int)
    got_np = colour_numpy(frames.copy(), name, args).astype(int)
    got_torch = colour_torch(torch.from_numpy(frames), name, args).numpy().astype(int)
    assert np.abs(got_torch - ref).max() == 0  # torch path: PIL's arithmetic exactly
    assert np.abs(got_np - ref).max() <= NUMPY_TOLERANCE.get(name, 0)
    assert torch.equal(apply_colour(torch.from_numpy(frames), name, args),
                       torch.from_numpy(got_np.astype(np.uint8)))


def _timm_geometry(img: np.ndarray, ops: list[tuple[str, tuple]]) -> np.ndarray:
    pil = Image.fromarray(img)
    for name, (v,) in ops:
        pil = NAME_TO_OP[name](pil, v, resample=Image.BICUBIC, fillcolor=(128, 128, 128))
    return np.asarray(pil).astype(int)


def _ours(img: np.ndarray, ops: ClipOps) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = img.shape[0]
    maps = ops.maps(s, s)
    m, fill = compose(maps), fill_mask(maps, s, s)
    worker = warp_clip(img[None], (0, 0, s, s), m, s, fill)[0].astype(int)
    device = warp_batch(torch.from_numpy(img[None, None]), [m], [fill])[0, 0].numpy().astype(int)
    return worker, device, fill


@pytest.mark.parametrize("name,v", [("Rotate", 21.0), ("Rotate", -9.5), ("ShearX", 0.21),
                                    ("ShearY", -0.2), ("TranslateXRel", 0.3),
                                    ("TranslateYRel", -0.25)])
def test_single_geometric_op_matches_timm_pil(name: str, v: float) -> None:
    # Tolerance: mean |diff| <= 1.5 and max <= 8 grey levels. The maps are the same; OpenCV and
    # torch use the bicubic kernel with a = -0.75, PIL a = -0.5, which moves single pixels by a few
    # levels on textured images.
    img = natural(96, 96, seed=3)
    ref = _timm_geometry(img, [(name, (v,))])
    for got in _ours(img, ClipOps([(name, (v,))]))[:2]:
        d = np.abs(got - ref)
        assert d.mean() <= 1.5 and d.max() <= 8, (name, d.mean(), d.max())


def _laplacian_energy(img: np.ndarray, keep: np.ndarray) -> float:
    lap = cv2.Laplacian(img.astype(np.float32).mean(-1), cv2.CV_32F)
    return float((lap[keep] ** 2).mean())


@pytest.mark.parametrize("seq", [
    [("Rotate", (14.0,)), ("ShearX", (-0.2,)), ("TranslateYRel", (0.2,))],
    [("ShearY", (0.25,)), ("Rotate", (-20.0,))],
    [("TranslateXRel", (-0.3,)), ("ShearX", (0.2,))],
])
def test_composed_geometry_is_one_warp_of_the_same_map(seq: list) -> None:
    # One warp vs timm's separate warps: the same geometry and fill region, but timm resamples once
    # per op, so its result is blurrier. Tolerance: mean |diff| <= 4 levels over the image and, away
    # from the fill edge (2 px), 99 % of pixels within 25 levels; the fill regions agree; ours keeps
    # more high-frequency energy.
    img = natural(96, 96, seed=4)
    ref = _timm_geometry(img, seq)
    for got in _ours(img, ClipOps(seq))[:2]:
        fill = _ours(img, ClipOps(seq))[2]
        edge = (cv2.dilate(fill.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
                & ~cv2.erode(fill.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool))
        d = np.abs(got - ref)
        assert d.mean() <= 4 and np.percentile(d[~edge], 99) <= 25, (
            d.mean(), np.percentile(d[~edge], 99))
        inner_fill = fill & ~edge
        assert (ref[inner_fill] == 128).all() and (got[inner_fill] == 128).all()
        inside = ~cv2.dilate(fill.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
        assert _laplacian_energy(got, inside) > _laplacian_energy(ref.astype(np.uint8), inside)


def _timm_draws(n: int, seed: int) -> list[list[tuple[str, tuple]]]:
    """What timm's RandAugment applies, recorded by replacing every op's image function."""
    ra = rand_augment_transform(SPEC, {"translate_const": 100, "img_mean": (128, 128, 128),
                                       "interpolation": Image.BICUBIC})
    record: list[tuple[str, tuple]] = []

    def recorder(name: str):
        def fn(img, *args, **kw):
            record.append((name, args))
            return img
        return fn

    for op in ra.ops:
        op.aug_fn = recorder(op.name)
    random.seed(seed)
    np.random.seed(seed)
    out = []
    for _ in range(n):
        record.clear()
        ra(None)
        out.append(list(record))
    return out


def _ks(a: list[float], b: list[float]) -> float:
    pooled = np.unique(np.concatenate([a, b]))
    ca = np.searchsorted(np.sort(a), pooled, side="right") / len(a)
    cb = np.searchsorted(np.sort(b), pooled, side="right") / len(b)
    return float(np.abs(ca - cb).max())


def test_draws_follow_timm_distribution() -> None:
    # 8000 clips each; seeded, so the test is deterministic. Bounds are ~4 standard errors (KS:
    # alpha ~ 1e-3).
    n = 8000
    theirs = _timm_draws(n, seed=0)
    policy, rng = RandAugmentPolicy(SPEC), np.random.default_rng(0)
    ours = [policy.draw(rng).ops for _ in range(n)]
    count_t, count_o = Counter(len(d) for d in theirs), Counter(len(d) for d in ours)
    for k in range(5):  # ops applied per clip: Binomial(4, 0.5)
        assert abs(count_t[k] - count_o[k]) / n < 0.025
    names_t = Counter(name for d in theirs for name, _ in d)
    names_o = Counter(name for d in ours for name, _ in d)
    assert set(names_t) == set(names_o) == set(policy.names) and len(policy.names) == 15
    tot_t, tot_o = sum(names_t.values()), sum(names_o.values())
    for name in names_t:
        assert abs(names_t[name] / tot_t - names_o[name] / tot_o) < 0.012, name
        args_t = [a[0] for nm, a in (op for d in theirs for op in d) if nm == name and a]
        args_o = [a[0] for nm, a in (op for d in ours for op in d) if nm == name and a]
        if args_t:
            assert _ks(args_t, args_o) < 0.1, name
            assert abs(np.mean(args_t) - np.mean(args_o)) <= 0.1 * np.std(args_t) + 1e-9, name


def test_worker_and_device_paths_agree_on_the_same_draw() -> None:
    # Same draw, same input crop: OpenCV (workers) and torch (device) give the same clip within a
    # few levels.
    clip = np.stack([natural(64, 64, seed=k) for k in range(3)])
    policy, rng = RandAugmentPolicy(SPEC), np.random.default_rng(5)
    for _ in range(40):
        ops = policy.draw(rng)
        maps = ops.maps(64, 64)
        fill = fill_mask(maps, 64, 64) if maps else None
        worker = torch.from_numpy(warp_clip(clip, (0, 0, 64, 64),
                                            compose(maps) if maps else np.eye(3), 64, fill))
        for name, args in ops.colour:
            worker = apply_colour(worker, name, args)
        device = torch.from_numpy(clip.copy())
        if maps:
            device = warp_batch(device[None], [compose(maps)], [fill])[0]
        for name, args in ops.colour:
            device = colour_torch(device, name, args)
        d = (worker.int() - device.int()).abs().float()
        # Equalize/AutoContrast/Posterize can turn a 1-level difference into a step: bound the mean,
        # not the max
        assert d.mean() <= 2.0, (ops.ops, d.mean())


def test_device_randaugment_reproducible_and_per_clip() -> None:
    frame = natural(32, 32, seed=9)
    video = torch.from_numpy(np.broadcast_to(frame, (8, 4, 32, 32, 3)).copy())
    ra = DeviceRandAugment(SPEC)
    a = ra({"video": video.clone()}, seed=7)["video"]
    b = ra({"video": video.clone()}, seed=7)["video"]
    c = ra({"video": video.clone()}, seed=8)["video"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.uint8 and a.shape == video.shape
    for i in range(8):  # one draw per clip, shared by every frame
        assert all(torch.equal(a[i, t], a[i, 0]) for t in range(4))
    # and different draws for different clips
    assert len({a[i].float().mean().item() for i in range(8)}) > 1


def test_erasing_one_box_per_clip_on_every_frame() -> None:
    er = Erase(0.5)
    x = torch.zeros(64, 3, 4, 32, 32)
    out = er({"video": x}, seed=3)["video"]
    erased = 0
    for i in range(64):
        changed = out[i] != 0  # [3, T, H, W]
        if not changed.any():
            continue
        erased += 1
        per_frame = changed.any(0)  # [T, H, W]
        # same box on every frame
        assert all(torch.equal(per_frame[t], per_frame[0]) for t in range(4))
        rows, cols = (per_frame[0].any(1).nonzero().flatten(),
                      per_frame[0].any(0).nonzero().flatten())
        area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) / 32 ** 2
        assert 0.015 <= area <= 0.36
        assert not torch.equal(out[i, :, 0], out[i, :, 1])  # pixel-mode noise differs per frame
    assert 16 <= erased <= 48  # probability 0.5 of 64 clips
    again = Erase(0.5)({"video": torch.zeros(64, 3, 4, 32, 32)}, seed=3)["video"]
    assert torch.equal(out, again)


def test_policy_rejects_unsupported_specs() -> None:
    for spec in ("augmix-m5", "rand-m9-tweights", "rand-x3"):
        with pytest.raises(ValueError):
            RandAugmentPolicy(spec)
    assert RandAugmentPolicy("rand-m9-n2-mstd101").mstd == float("inf")
    assert op_matrix("Rotate", 0.0, 10, 10) == pytest.approx(np.eye(3))


def test_worker_and_device_paths_same_statistics() -> None:
    # Over many clips, the two paths change a clip equally often and by equally much (same policy,
    # same ops).
    from tstl.data import DataConfig as Cfg
    from tstl.data.transforms import TrainClipTransform

    frame = natural(32, 32, seed=11)
    frames = np.repeat(frame[None], 2, axis=0)
    n = 300
    tf = TrainClipTransform(Cfg(input_size=32, rand_augment=SPEC, rrc_scale=(1.0, 1.0),
                                rrc_ratio=(1.0, 1.0)))
    worker = [tf(frames, np.random.default_rng(k)).int() for k in range(n)]
    ra = DeviceRandAugment(SPEC)
    video = torch.from_numpy(np.broadcast_to(frames, (n, 2, 32, 32, 3)).copy())
    device = ra({"video": video}, seed=1)["video"].int()
    base = torch.from_numpy(frames).int()
    change_w = [float((c - base).abs().float().mean()) for c in worker]
    change_d = [float((device[k] - base).abs().float().mean()) for k in range(n)]
    untouched_w = sum(c == 0 for c in change_w) / n
    untouched_d = sum(c == 0 for c in change_d) / n
    assert abs(untouched_w - untouched_d) < 0.08  # P(no op fires) = 1/16 on both paths
    assert _ks(change_w, change_d) < 0.15
