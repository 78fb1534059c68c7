"""Clip augmentation (training) and multi-crop views (evaluation) on decoded uint8 frames.

Training follows the CAST/VideoMAE recipe: one random resized crop box, one RandAugment draw, one flip decision
and one erasing box per clip, shared by every frame. timm's transforms draw their randomness from Python's
``random`` and NumPy's global generators inside each call, so the clip-level draw is obtained by restoring those
generators' state before each frame.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation

from tstl.data.config import DataConfig
from tstl.data.spatial import short_side_jitter_crop  # [recipes] data.train_crop=short_side_jitter


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed ``random``, NumPy and torch global generators for the block and restore them afterwards."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def normalize(frames: np.ndarray | torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> normalised float ``[3, T, H, W]``."""
    # Transpose while still uint8 (a quarter of the bytes) and convert with NumPy: torch's uint8 -> float cast
    # and strided float ops measured 5-10x slower here and were the largest cost of a training clip.
    arr = frames.numpy() if isinstance(frames, torch.Tensor) else frames
    x = torch.from_numpy(np.ascontiguousarray(arr.transpose(3, 0, 1, 2)).astype(np.float32))
    scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(3, 1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(3, 1, 1, 1)
    return x.mul_(scale).add_(shift)


class TrainClipTransform:
    """Random resized crop, RandAugment, flip, normalisation and random erasing, identical on every frame."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.size = cfg.input_size
        self.rand_augment = None
        if cfg.rand_augment:
            hparams = {"translate_const": int(cfg.input_size * 0.45), "img_mean": (128, 128, 128)}
            self.rand_augment = rand_augment_transform(cfg.rand_augment, hparams)
        self.erase = RandomErasing(cfg.reprob, mode="pixel", device="cpu") if cfg.reprob > 0 else None

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 ``[T, H, W, 3]`` -> float ``[3, T, S, S]``; call under ``seeded(...)`` for reproducibility."""
        if self.cfg.train_crop == "short_side_jitter":  # [recipes] PySlowFast geometry, see tstl.data.spatial
            box = short_side_jitter_crop(frames.shape[1], frames.shape[2], self.size, self.cfg.jitter_scales,
                                         np.random.default_rng(random.getrandbits(32)),
                                         self.cfg.jitter_inverse_uniform).box
        else:
            first = Image.fromarray(frames[0])
            top, left, h, w = RandomResizedCropAndInterpolation.get_params(
                first, tuple(self.cfg.rrc_scale), tuple(self.cfg.rrc_ratio))
            box = (left, top, left + w, top + h)
        flip = self.cfg.flip and random.random() < 0.5
        # One snapshot of the generators; every frame replays it, so RandAugment's ops and magnitudes match.
        state = random.getstate(), np.random.get_state()
        out = np.empty((len(frames), self.size, self.size, 3), dtype=np.uint8)
        for i, frame in enumerate(frames):
            img = Image.fromarray(frame).resize((self.size, self.size), Image.BILINEAR, box=box)
            if self.rand_augment is not None:
                random.setstate(state[0])
                np.random.set_state(state[1])
                img = self.rand_augment(img)
            if flip:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            out[i] = np.asarray(img)
        clip = normalize(out, self.cfg.mean, self.cfg.std)
        if self.erase is not None:
            # Viewing [3, T, H, W] as [3T, H, W] makes timm erase the same box in every frame.
            c, t, hh, ww = clip.shape
            self.erase(clip.view(c * t, hh, ww))
        return clip


class EvalViews:
    """Short-side resize and ``C`` spatial crops along the long side (C = 1: centre crop)."""

    def __init__(self, cfg: DataConfig, num_crops: int) -> None:
        self.cfg = cfg
        self.size = cfg.input_size
        self.short = cfg.short_side_scale or cfg.input_size
        self.num_crops = num_crops

    def resize(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 ``[T, H, W, 3]`` -> uint8 ``[T, 3, h, w]`` with the short side at ``short_side_scale``."""
        x = torch.from_numpy(frames).permute(0, 3, 1, 2)
        h, w = x.shape[-2:]
        scale = self.short / min(h, w)
        nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        if (nh, nw) == (h, w):
            return x
        y = F.interpolate(x.float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
        return y.round_().clamp_(0, 255).to(torch.uint8)

    def crop(self, x: torch.Tensor, c: int) -> torch.Tensor:
        """Spatial crop ``c`` of a resized clip, normalised to float ``[3, T, S, S]``."""
        h, w = x.shape[-2:]
        s = self.size
        step_h = (h - s) / (self.num_crops - 1) if self.num_crops > 1 else (h - s) / 2
        step_w = (w - s) / (self.num_crops - 1) if self.num_crops > 1 else (w - s) / 2
        pos = c if self.num_crops > 1 else 1
        top = int(pos * step_h) if h >= w else (h - s) // 2
        left = int(pos * step_w) if w > h else (w - s) // 2
        patch = x[:, :, top:top + s, left:left + s].permute(0, 2, 3, 1)
        return normalize(patch, self.cfg.mean, self.cfg.std)
