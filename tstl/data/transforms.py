"""Clip transforms in the DataLoader workers: training crops (+ fused RandAugment) and evaluation
views, uint8 out.

Training follows the CAST/VideoMAE recipe with one draw per clip shared by every frame: a random
resized crop box (timm's parameter draw), optionally a horizontal flip, and
(``data.augment_on: worker``) one RandAugment draw. The crop, the flip and RandAugment's geometric
ops compose into one affine map, applied to each frame in a single bicubic warp at the output size
(``tstl.data.augment``); the colour ops follow as lookup tables. With ``augment_on: device`` the
workers only crop (and flip) and RandAugment runs batched on the training device
(``tstl.data.device``). The transforms of ``CLIP_TRANSFORMS`` (the worker-side hook) then run in
order on the uint8 clip. Either way a clip leaves the worker as uint8 ``[T, S, S, 3]`` (channels
last, as decoded); normalisation, random erasing and mixup run on the batch in the training process
(``tstl.data.device``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from tstl.data.augment import (
    FILL,
    RandAugmentPolicy,
    apply_colour_ops,
    compose,
    crop_matrix,
    fill_mask,
)
from tstl.data.config import DataConfig
from tstl.data.spatial import short_side_jitter_crop  # [recipes] data.train_crop=short_side_jitter

# Workers are processes already; OpenCV's own thread pool would only oversubscribe the cores.
cv2.setNumThreads(1)


def rrc_params(img_h: int, img_w: int, scale: tuple[float, float], ratio: tuple[float, float],
               rng: np.random.Generator) -> tuple[int, int, int, int]:
    """timm ``RandomResizedCropAndInterpolation.get_params`` with an explicit generator:
    ``(top, left, h, w)``."""
    area = img_w * img_h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if w <= img_w and h <= img_h:
            return int(rng.integers(0, img_h - h + 1)), int(rng.integers(0, img_w - w + 1)), h, w
    in_ratio = img_w / img_h
    if in_ratio < min(ratio):
        w, h = img_w, int(round(img_w / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = img_h, int(round(img_h * max(ratio)))
    else:
        w, h = img_w, img_h
    return (img_h - h) // 2, (img_w - w) // 2, h, w


def warp_clip(frames: np.ndarray, box: tuple[int, int, int, int], m: np.ndarray, size: int,
              fill: np.ndarray | None = None) -> np.ndarray:
    """Resample every frame once: output pixel ``p`` reads the crop box at ``m @ p`` (crop-local
    coordinates).

    With RandAugment geometry: bicubic (OpenCV, a = -0.75; RandAugment's interpolation), the support
    clamped to the crop box edge as in PIL's ``transform``; pixels in ``fill``
    (``augment.fill_mask``: where timm's ops would have left the image) get the fill colour 128; no
    antialiasing. A pure scale (no RandAugment geometry; a flip at most) is a plain ``cv2.resize``,
    bilinear as the reference crop (VideoMAE/CAST ``random_resized_crop``: bilinear
    ``F.interpolate``, the same half-pixel centres), with area averaging when it shrinks 2x or more.
    """
    top, left, h, w = box
    t = frames.shape[0]
    out = np.empty((t, size, size, 3), dtype=np.uint8)
    flipped = m[0, 0] < 0 and np.isclose(m[0, 2], -m[0, 0] * size)
    if (m[0, 1] == 0 and m[1, 0] == 0 and m[1, 2] == 0 and m[1, 1] > 0
            and (flipped or (m[0, 0] > 0 and m[0, 2] == 0))):
        # A pure scale (plus at most a horizontal flip): one resize, bilinear like the reference's
        # crop resize. Shrinking by 2x or more uses area averaging instead (a deliberate deviation:
        # bilinear alone aliases badly at large reductions, 240 p -> 32 px in the CPU demo). Milder
        # scales (240 p SSV2 -> 224 crops: <= 1.9x) stay bilinear, where aliasing is slight and area
        # averaging at a fractional ratio costs a third of a decode.
        interp = cv2.INTER_AREA if max(w, h) >= 2 * size else cv2.INTER_LINEAR
        for i in range(t):
            cv2.resize(frames[i, top:top + h, left:left + w], (size, size), dst=out[i],
                       interpolation=interp)
        return out[:, :, ::-1].copy() if flipped else out
    # continuous coordinates (centres at +0.5) -> OpenCV's integer-centred ones, on both sides of
    # the map
    shift = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    mat = (np.linalg.inv(shift) @ m @ shift)[:2]
    for i in range(t):
        cv2.warpAffine(frames[i, top:top + h, left:left + w], mat, (size, size), dst=out[i],
                       flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                       borderMode=cv2.BORDER_REPLICATE)
    if fill is not None and fill.any():
        np.copyto(out, np.uint8(FILL), where=fill[None, :, :, None])
    return out


def flip_matrix(size: int) -> np.ndarray:
    """Output -> input map of a horizontal flip of a ``size``-wide image."""
    return np.array([[-1.0, 0.0, float(size)], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


ClipFn = Callable[[torch.Tensor, np.random.Generator], torch.Tensor]
"""A worker-side clip transform: uint8 ``[T, S, S, 3]`` in and out, every draw from the generator
it is given."""

CLIP_TRANSFORMS: dict[str, Callable[[DataConfig], ClipFn | None]] = {}
"""The worker-side hook: name -> builder of a training clip transform (None: off for this config),
run in order after the fused crop/flip/RandAugment warp (which stays one step: it resamples each
frame once). Each draws from its own generator keyed by its name (``transform_rng``), so adding one
changes no other draw. Empty as shipped; docs/loader.md ("Adding an augmentation") adds one."""


def transform_rng(rng: np.random.Generator, name: str) -> np.random.Generator:
    """The generator of clip transform ``name``: a child of ``rng``'s seed keyed by the name's
    CRC-32, made without drawing from ``rng`` (the crop and RandAugment draws stay as they are)."""
    seq = rng.bit_generator.seed_seq
    key = (*seq.spawn_key, zlib.crc32(name.encode()))
    child = np.random.SeedSequence(seq.entropy, spawn_key=key)
    return np.random.default_rng(child)


class TrainClipTransform:
    """Worker side of training augmentation: crop box, flip and (``augment``) RandAugment, one draw
    per clip, then the ``CLIP_TRANSFORMS`` hook.

    Args:
        cfg: loader configuration.
        augment: run RandAugment here (``augment_on: worker``); False leaves it to the device step.
    """

    def __init__(self, cfg: DataConfig, augment: bool = True) -> None:
        self.cfg = cfg
        self.size = cfg.input_size
        self.policy = (RandAugmentPolicy(cfg.rand_augment) if (augment and cfg.rand_augment)
                       else None)
        built = ((name, make(cfg)) for name, make in CLIP_TRANSFORMS.items())
        self.extra: list[tuple[str, ClipFn]] = [(name, fn) for name, fn in built if fn is not None]

    def crop_box(self, height: int, width: int,
                 rng: np.random.Generator) -> tuple[int, int, int, int]:
        """The clip's crop box ``(top, left, h, w)`` in source pixels: timm's random resized crop,
        or PySlowFast's short-side jitter + random crop (``data.train_crop``, see
        ``tstl.data.spatial``), whose box is rounded to whole source pixels here (the single warp
        then scales it to ``input_size``; a sub-pixel difference)."""
        if self.cfg.train_crop == "short_side_jitter":
            crop = short_side_jitter_crop(height, width, self.size, self.cfg.jitter_scales, rng,
                                          self.cfg.jitter_inverse_uniform)
            left, top, right, bottom = crop.box
            t, lft = int(round(top)), int(round(left))
            return (t, lft, max(1, min(height - t, int(round(bottom)) - t)),
                    max(1, min(width - lft, int(round(right)) - lft)))
        return rrc_params(height, width, tuple(self.cfg.rrc_scale), tuple(self.cfg.rrc_ratio), rng)

    def __call__(self, frames: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """uint8 ``[T, H, W, 3]`` -> uint8 ``[T, S, S, 3]``; every draw comes from ``rng``."""
        s = self.size
        top, left, h, w = self.crop_box(frames.shape[1], frames.shape[2], rng)
        flip = self.cfg.flip and rng.random() < 0.5
        ops = self.policy.draw(rng) if self.policy is not None else None
        maps = ops.maps(s, s) if ops is not None else []
        if flip:  # timm/CAST flip after RandAugment: the flip is the last map applied to the output
            maps.append(flip_matrix(s))
        m = crop_matrix(w, h, s) @ compose(maps)
        fill = fill_mask(maps, s, s) if maps else None
        clip = torch.from_numpy(warp_clip(frames, (top, left, h, w), m, s, fill))
        if ops is not None:
            clip = apply_colour_ops(clip, ops)
        for name, fn in self.extra:
            clip = fn(clip, transform_rng(rng, name))
        return clip


class EvalViews:
    """Short-side resize and ``C`` spatial crops along the long side (C = 1: centre crop)."""

    def __init__(self, cfg: DataConfig, num_crops: int) -> None:
        self.cfg = cfg
        self.size = cfg.input_size
        self.short = cfg.short_side_scale or cfg.input_size
        self.num_crops = num_crops

    def resize(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 ``[T, H, W, 3]`` -> uint8 ``[T, 3, h, w]`` with the short side at
        ``short_side_scale``."""
        x = torch.from_numpy(frames).permute(0, 3, 1, 2)
        h, w = x.shape[-2:]
        scale = self.short / min(h, w)
        nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        if (nh, nw) == (h, w):
            return x
        y = F.interpolate(x.float(), size=(nh, nw), mode="bilinear", align_corners=False,
                          antialias=scale < 1)
        return y.round_().clamp_(0, 255).to(torch.uint8)

    def crop(self, x: torch.Tensor, c: int) -> torch.Tensor:
        """Spatial crop ``c`` of a resized clip as uint8 ``[T, S, S, 3]`` (normalised later, on the
        batch)."""
        h, w = x.shape[-2:]
        s = self.size
        step_h = (h - s) / (self.num_crops - 1) if self.num_crops > 1 else (h - s) / 2
        step_w = (w - s) / (self.num_crops - 1) if self.num_crops > 1 else (w - s) / 2
        pos = c if self.num_crops > 1 else 1
        top = int(pos * step_h) if h >= w else (h - s) // 2
        left = int(pos * step_w) if w > h else (w - s) // 2
        return x[:, :, top:top + s, left:left + s].permute(0, 2, 3, 1).contiguous()
