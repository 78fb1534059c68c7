"""Crop geometry of the training augmentations, as pure functions of the frame size and a random
generator.

Kept apart from the pixel work (``tstl.data.transforms``) so the geometry can be held against the
reference code exactly. Sizes are ``(height, width)``; boxes are in source-frame pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class JitterCrop:
    """PySlowFast's short-side scale jitter followed by a random crop.

    ``resized`` is the frame size after the jitter; ``top``/``left`` the crop's corner in the
    resized frame; ``size`` the crop's side. ``box`` maps the crop back onto the source frame (for a
    resize-with-box).
    """

    source: tuple[int, int]
    resized: tuple[int, int]
    top: int
    left: int
    size: int

    @property
    def box(self) -> tuple[float, float, float, float]:
        """``(left, top, right, bottom)`` of the crop in source pixels (PIL's ``resize(box=...)``
        order)."""
        (h, w), (rh, rw) = self.source, self.resized
        sy, sx = h / rh, w / rw
        return (self.left * sx, self.top * sy, (self.left + self.size) * sx,
                (self.top + self.size) * sy)


def jitter_short_side(rng: np.random.Generator, min_size: int, max_size: int,
                      inverse_uniform: bool = False) -> int:
    """The jittered short side: ``int(round(U(min, max)))`` (Python and NumPy both round half to
    even), or ``int(round(1 / U(1/max, 1/min)))``.

    facebookresearch/TimeSformer ``timesformer/datasets/transform.py:30-35``
    (``random_short_side_scale_jitter``).
    """
    if inverse_uniform:
        return round(1.0 / rng.uniform(1.0 / max_size, 1.0 / min_size))
    return round(rng.uniform(min_size, max_size))


def scaled_size(height: int, width: int, short: int) -> tuple[int, int]:
    """Frame size with the short side at ``short``, the long side
    ``floor(long / short_side * short)``.

    ``timesformer/datasets/transform.py:37-52``: unchanged when the short side already equals
    ``short``.
    """
    if (width <= height and width == short) or (height <= width and height == short):
        return height, width
    if width < height:
        return math.floor(float(height) / width * short), short
    return short, math.floor(float(width) / height * short)


def random_crop_offset(rng: np.random.Generator, height: int, width: int,
                       size: int) -> tuple[int, int]:
    """Top-left corner of PySlowFast's random crop: ``randint(0, H - size)`` (high excluded, so the
    last position is never drawn) on each axis longer than ``size``, else 0
    (``timesformer/datasets/transform.py:99-108``)."""
    if height == size and width == size:
        return 0, 0
    top = int(rng.integers(0, height - size)) if height > size else 0
    left = int(rng.integers(0, width - size)) if width > size else 0
    return top, left


def short_side_jitter_crop(height: int, width: int, size: int, scales: tuple[int, int],
                           rng: np.random.Generator, inverse_uniform: bool = False) -> JitterCrop:
    """Geometry of ``spatial_sampling(spatial_idx=-1)`` without aspect/scale ranges (TimeSformer
    training): jitter the short side in ``scales``, then crop ``size`` x ``size`` at a random
    position.

    facebookresearch/TimeSformer ``timesformer/datasets/utils.py:142-149``. The horizontal flip that
    follows is drawn by the transform (``data.flip``).
    """
    short = jitter_short_side(rng, scales[0], scales[1], inverse_uniform)
    rh, rw = scaled_size(height, width, short)
    if min(rh, rw) < size:
        raise ValueError(f"short side {short} is smaller than the crop {size}; jitter_scales must "
                         "start >= the crop")
    top, left = random_crop_offset(rng, rh, rw, size)
    return JitterCrop(source=(height, width), resized=(rh, rw), top=top, left=left, size=size)
