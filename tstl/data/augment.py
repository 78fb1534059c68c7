"""timm RandAugment as per-clip parameters: one draw, one affine map for the geometry, colour ops.

timm's ``RandAugment`` draws inside every call from Python's and NumPy's global generators and
resamples the image once per geometric op (PIL, at whatever size it is given). Here the same policy
is split in two:

* ``RandAugmentPolicy.draw(rng)`` draws one clip's ops (``ClipOps``) with the distribution of timm's
  ``rand_augment_transform(spec)``: ``n`` ops chosen uniformly with replacement from the (``inc``)
  op set, each applied with probability ``p``, magnitude ``N(m, mstd)`` clipped to
  ``[0, mmax or 10]``, then the op's level function (``LEVEL_TO_ARG``; random sign for the signed
  ops). The draw uses an explicit ``numpy.random.Generator``.
* The geometric ops (``GEOMETRIC_OPS``: Rotate, ShearX/Y, TranslateX/YRel) compose into one 3x3 map
  (``ClipOps.maps`` + ``compose``); the caller folds the random-resized-crop box into it and
  resamples each frame once, bicubic, at the output size.
* The colour ops (``COLOUR_OPS``, ``apply_colour``) follow PIL's arithmetic
  (``ImageOps``/``ImageEnhance``), as lookup tables where the op is per pixel value, on uint8
  ``[T, H, W, 3]`` tensors on any device; the histogram ops (Equalize, AutoContrast) and Contrast's
  mean use each frame's own statistics, as timm applying the op frame by frame does.

The ops are tables, as in timm's ``auto_augment.py`` (``LEVEL_TO_ARG``, ``NAME_TO_OP``): an op name
maps to its level function and to its image function (a 3x3 map for a geometric op; an OpenCV/NumPy
and a torch implementation for a colour op, the worker and the device path). Adding an op is its
functions plus one entry per table (docs/loader.md, "Adding an augmentation").

Deliberate deviations from timm (documented in docs/loader.md): one resampling instead of one per
geometric op (less blur), the colour ops run after the single warp (they commute with it except on
the fill colour and through the image statistics of Equalize/AutoContrast/Contrast), bicubic always
(CAST's ``--train_interpolation bicubic``; timm without an ``interpolation`` hparam picks bilinear
or bicubic at random per op).

Coordinates: continuous pixel coordinates with pixel centres at ``i + 0.5`` (PIL's convention for
``transform``); a map sends output coordinates to input coordinates.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

LEVEL_DENOM = 10.0
FILL = 128


# ---- level functions: magnitude -> op arguments (timm auto_augment.py LEVEL_TO_ARG) ------------
LevelFn = Callable[[float, np.random.Generator, dict], tuple]
"""``(magnitude, rng, hparams) -> op arguments``: timm's ``LEVEL_TO_ARG[name](level, hparams)``,
with ``rng`` in place of the ``random.random()`` of timm's ``_randomly_negate``."""


def _negate(v: float, rng: np.random.Generator) -> float:
    return -v if rng.random() > 0.5 else v


def _no_args(level: float, rng: np.random.Generator, hp: dict) -> tuple:
    return ()


def _rotate_level(level: float, rng: np.random.Generator, hp: dict) -> tuple:
    return (_negate(level / LEVEL_DENOM * 30.0, rng),)


def _shear_level(level: float, rng: np.random.Generator, hp: dict) -> tuple:
    return (_negate(level / LEVEL_DENOM * 0.3, rng),)


def _translate_rel_level(level: float, rng: np.random.Generator, hp: dict) -> tuple:
    return (_negate(level / LEVEL_DENOM * hp["translate_pct"], rng),)


def _posterize_level(level: float, rng: np.random.Generator, hp: dict) -> tuple:
    return (int(level / LEVEL_DENOM * 4),)


def _posterize_increasing_level(level: float, rng: np.random.Generator, hp: dict) -> tuple:
    return (4 - int(level / LEVEL_DENOM * 4),)


def _posterize_original_level(level: float, rng: np.random.Generator, hp: dict) -> tuple:
    return (int(level / LEVEL_DENOM * 4) + 4,)


def _solarize_level(level: float, rng: np.random.Generator, hp: dict) -> tuple:
    return (min(256, int(level / LEVEL_DENOM * 256)),)


def _solarize_increasing_level(level: float, rng: np.random.Generator, hp: dict) -> tuple:
    return (256 - min(256, int(level / LEVEL_DENOM * 256)),)


def _solarize_add_level(level: float, rng: np.random.Generator, hp: dict) -> tuple:
    return (min(128, int(level / LEVEL_DENOM * 110)),)


def _enhance_level(level: float, rng: np.random.Generator, hp: dict) -> tuple:
    return (level / LEVEL_DENOM * 1.8 + 0.1,)


def _enhance_increasing_level(level: float, rng: np.random.Generator, hp: dict) -> tuple:
    return (max(0.1, 1.0 + _negate(level / LEVEL_DENOM * 0.9, rng)),)


LEVEL_TO_ARG: dict[str, LevelFn] = {
    "AutoContrast": _no_args,
    "Equalize": _no_args,
    "Invert": _no_args,
    "Rotate": _rotate_level,
    "Posterize": _posterize_level,
    "PosterizeIncreasing": _posterize_increasing_level,
    "PosterizeOriginal": _posterize_original_level,
    "Solarize": _solarize_level,
    "SolarizeIncreasing": _solarize_increasing_level,
    "SolarizeAdd": _solarize_add_level,
    "Color": _enhance_level,
    "ColorIncreasing": _enhance_increasing_level,
    "Contrast": _enhance_level,
    "ContrastIncreasing": _enhance_increasing_level,
    "Brightness": _enhance_level,
    "BrightnessIncreasing": _enhance_increasing_level,
    "Sharpness": _enhance_level,
    "SharpnessIncreasing": _enhance_increasing_level,
    "ShearX": _shear_level,
    "ShearY": _shear_level,
    "TranslateXRel": _translate_rel_level,
    "TranslateYRel": _translate_rel_level,
}
"""Op name -> level function (timm ``auto_augment.py`` ``LEVEL_TO_ARG``)."""

RAND_TRANSFORMS = ["AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                   "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX",
                   "ShearY", "TranslateXRel", "TranslateYRel"]
"""The op set of a ``rand-...`` spec (timm ``_RAND_TRANSFORMS``); the draws depend on its order."""
RAND_INCREASING_TRANSFORMS = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing",
                              "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
                              "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]
"""The op set of a ``rand-...-inc1`` spec (timm ``_RAND_INCREASING_TRANSFORMS``)."""


def base_op(name: str) -> str:
    """``ColorIncreasing`` -> ``Color`` etc.: the image operation an op name applies (timm's
    ``NAME_TO_OP`` maps these names to the same function)."""
    for suffix in ("Increasing", "Original"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# ---- geometric ops: name -> 3x3 output -> input map (PIL ``transform``/``rotate`` coefficients) -
MapFn = Callable[[float, float, float], np.ndarray]
"""``(v, width, height) -> 3x3`` output -> input map of a geometric op on a ``width x height``
image."""


def _shear_x(v: float, width: float, height: float) -> np.ndarray:
    return np.array([[1.0, v, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def _shear_y(v: float, width: float, height: float) -> np.ndarray:
    return np.array([[1.0, 0.0, 0.0], [v, 1.0, 0.0], [0.0, 0.0, 1.0]])


def _translate_x_rel(v: float, width: float, height: float) -> np.ndarray:
    return np.array([[1.0, 0.0, v * width], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def _translate_y_rel(v: float, width: float, height: float) -> np.ndarray:
    return np.array([[1.0, 0.0, 0.0], [0.0, 1.0, v * height], [0.0, 0.0, 1.0]])


def _rotate(v: float, width: float, height: float) -> np.ndarray:
    """PIL ``Image.rotate(v)``: counter-clockwise about the centre ``(w/2, h/2)``."""
    a = -math.radians(v)
    c, s = round(math.cos(a), 15), round(math.sin(a), 15)
    cx, cy = width / 2.0, height / 2.0
    return np.array([[c, s, cx - c * cx - s * cy], [-s, c, cy + s * cx - c * cy], [0.0, 0.0, 1.0]])


GEOMETRIC_OPS: dict[str, MapFn] = {
    "Rotate": _rotate,
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x_rel,
    "TranslateYRel": _translate_y_rel,
}
"""Geometric op name -> its map; the worker (OpenCV) and the device (torch) path warp with it."""


@dataclass
class ClipOps:
    """One clip's RandAugment draw: the ops that fire, in order, with their arguments."""

    ops: list[tuple[str, tuple]] = field(default_factory=list)

    @property
    def geometric(self) -> list[tuple[str, tuple]]:
        return [(n, a) for n, a in self.ops if n in GEOMETRIC_OPS]

    @property
    def colour(self) -> list[tuple[str, tuple]]:
        return [(base_op(n), a) for n, a in self.ops if n not in GEOMETRIC_OPS]

    def maps(self, width: float, height: float) -> list[np.ndarray]:
        """3x3 output -> input map of each geometric op on a ``width x height`` image, in the order
        applied."""
        return [op_matrix(name, v, width, height) for name, (v,) in self.geometric]


class RandAugmentPolicy:
    """Parse a timm RandAugment spec (``rand-m7-n4-mstd0.5-inc1``) and draw per-clip ops."""

    def __init__(self, spec: str, translate_pct: float = 0.45) -> None:
        self.spec = spec
        self.magnitude, self.num_layers, self.prob = 10.0, 2, 0.5
        self.mstd, self.mmax, increasing = 0.0, None, False
        parts = spec.split("-")
        if parts[0] != "rand":
            raise ValueError(f"data.rand_augment {spec!r}: only timm 'rand-...' specs are "
                             "supported")
        for c in parts[1:]:
            if c.startswith("t"):
                raise ValueError(f"data.rand_augment {spec!r}: transform sets ('t...') are not "
                                 "supported")
            key, val = (re.split(r"(\d.*)", c) + [""])[:2]
            if key == "mstd":
                self.mstd = float("inf") if float(val) > 100 else float(val)
            elif key == "mmax":
                self.mmax = int(val)
            elif key == "inc":
                increasing = bool(int(val))
            elif key == "m":
                self.magnitude = float(int(val))
            elif key == "n":
                self.num_layers = int(val)
            elif key == "p":
                self.prob = float(val)
            else:
                raise ValueError(f"data.rand_augment {spec!r}: unknown section {c!r}")
        self.names = list(RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS)
        unknown = [n for n in self.names if n not in LEVEL_TO_ARG
                   or (n not in GEOMETRIC_OPS and base_op(n) not in COLOUR_OPS)]
        if unknown:
            raise ValueError(f"RandAugment ops {unknown} lack a LEVEL_TO_ARG, GEOMETRIC_OPS or "
                             "COLOUR_OPS entry (tstl/data/augment.py)")
        self.translate_pct = translate_pct
        self.hparams = {"translate_pct": translate_pct}

    def draw(self, rng: np.random.Generator) -> ClipOps:
        """timm's draw order: ``n`` ops (with replacement), then per op: apply?, magnitude, args."""
        chosen = rng.integers(0, len(self.names), size=self.num_layers)
        ops = []
        for k in chosen:
            name = self.names[int(k)]
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            m = self.magnitude
            if self.mstd == float("inf"):
                m = rng.uniform(0, m)
            elif self.mstd > 0:
                m = rng.normal(m, self.mstd)
            m = max(0.0, min(m, self.mmax or LEVEL_DENOM))
            ops.append((name, LEVEL_TO_ARG[name](m, rng, self.hparams)))
        return ClipOps(ops)


# ---- geometry ----------------------------------------------------------------------------------
def op_matrix(name: str, v: float, width: float, height: float) -> np.ndarray:
    """3x3 output -> input map of one geometric op (``GEOMETRIC_OPS``)."""
    if name not in GEOMETRIC_OPS:
        raise ValueError(f"unknown geometric op {name!r}")
    return GEOMETRIC_OPS[name](v, width, height)


def compose(maps: list[np.ndarray]) -> np.ndarray:
    """One output -> input map for warps applied in order: image_k(p) = image_{k-1}(M_k p), so
    M_1 M_2 ... M_k."""
    m = np.eye(3)
    for a in maps:
        m = m @ a
    return m


def fill_mask(maps: list[np.ndarray], width: int, height: int) -> np.ndarray:
    """Output pixels that timm's separate warps (``maps``, in order, each on a ``width x height``
    image) fill.

    A pixel gets the fill colour when its source position leaves the image at any intermediate step
    (content an earlier op moved out of the frame is lost for the later ops); the single warp
    reproduces exactly that region.
    """
    cx, cy = np.arange(width) + 0.5, np.arange(height) + 0.5
    xs, ys = np.meshgrid(cx, cy)
    mask = np.zeros((height, width), dtype=bool)
    m = np.eye(3)
    for a in reversed(maps):
        m = a @ m
        x = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
        y = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
        mask |= (x < 0) | (x >= width) | (y < 0) | (y >= height)
    return mask


def crop_matrix(box_w: float, box_h: float, size: int) -> np.ndarray:
    """Output ``size x size`` -> crop box of ``box_w x box_h`` (crop-local coordinates)."""
    return np.diag([box_w / size, box_h / size, 1.0])


# ---- colour ops on uint8 [T, H, W, 3]: name -> (OpenCV/NumPy, torch) ----------------------------
@dataclass(frozen=True)
class ColourOp:
    """A colour op's two implementations on uint8 ``[T, H, W, 3]``, frame by frame like PIL:
    ``numpy`` (OpenCV/NumPy, for the workers' CPU clips) and ``torch`` (any device: the device
    path); both are compared with timm's PIL op in the tests."""

    numpy: Callable[[np.ndarray, tuple], np.ndarray]
    torch: Callable[[torch.Tensor, tuple], torch.Tensor]


def _lut_apply(x: torch.Tensor, lut: np.ndarray) -> torch.Tensor:
    """Apply a 256-entry uint8 table, or per-frame per-channel tables ``[T, 3, 256]``, to
    ``[T, H, W, 3]``."""
    table = torch.as_tensor(lut, device=x.device)
    if lut.ndim == 1:
        return table[x.long()]
    t = x.shape[0]
    offs = (torch.arange(t, device=x.device).view(t, 1, 1, 1) * 3
            + torch.arange(3, device=x.device)) * 256
    return table.reshape(-1)[x.long() + offs]


def _histograms(x: torch.Tensor) -> np.ndarray:
    """Per-frame, per-channel histograms ``[T, 3, 256]`` (int64, on the CPU)."""
    t = x.shape[0]
    offs = (torch.arange(t, device=x.device).view(t, 1, 1, 1) * 3
            + torch.arange(3, device=x.device)) * 256
    counts = torch.bincount((x.long() + offs).reshape(-1), minlength=t * 768)
    return counts.view(t, 3, 256).cpu().numpy()


def _blend(x: torch.Tensor, degenerate: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ``Image.blend(degenerate, x, factor)``: ``degenerate + factor * (x - degenerate)``,
    clipped, truncated."""
    d = degenerate.float()
    return (d + factor * (x.float() - d)).clamp_(0, 255).to(torch.uint8)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """PIL RGB -> L: ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16``, as ``[T, H, W, 1]`` int32."""
    xi = x.to(torch.int32)
    return ((xi[..., 0:1] * 19595 + xi[..., 1:2] * 38470 + xi[..., 2:3] * 7471 + 0x8000) >> 16)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageFilter.SMOOTH`` (3x3, centre 5, /13, rounded); the one-pixel border keeps the
    input."""
    t, h, w, _ = x.shape
    k = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device) / 13.0
    xf = x.permute(0, 3, 1, 2).reshape(t * 3, 1, h, w).float()
    y = F.conv2d(xf, k.view(1, 1, 3, 3)).add_(0.5).clamp_(0, 255).floor_()
    out = xf.clone()
    out[:, :, 1:-1, 1:-1] = y
    return out.view(t, 3, h, w).permute(0, 2, 3, 1)


_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13.0


def lut_op(table: Callable[[tuple], np.ndarray | None]) -> ColourOp:
    """A colour op that is one 256-entry uint8 table of its arguments (None: the identity), on both
    paths."""

    def on_numpy(a: np.ndarray, args: tuple) -> np.ndarray:
        import cv2

        lut = table(args)
        if lut is None:
            return a
        t, h, w, _ = a.shape
        return cv2.LUT(a.reshape(t * h, w, 3), lut).reshape(a.shape)

    def on_torch(x: torch.Tensor, args: tuple) -> torch.Tensor:
        lut = table(args)
        return x if lut is None else _lut_apply(x, lut)

    return ColourOp(on_numpy, on_torch)


def _invert_lut(args: tuple) -> np.ndarray:
    return (255 - np.arange(256)).astype(np.uint8)


def _posterize_lut(args: tuple) -> np.ndarray | None:
    if args[0] >= 8:
        return None
    return (np.arange(256) & ~(2 ** (8 - args[0]) - 1)).astype(np.uint8)


def _solarize_lut(args: tuple) -> np.ndarray:
    i = np.arange(256)
    return np.where(i < args[0], i, 255 - i).astype(np.uint8)


def _solarize_add_lut(args: tuple) -> np.ndarray:
    i = np.arange(256)
    return np.where(i < 128, np.minimum(255, i + args[0]), i).astype(np.uint8)


def _brightness_lut(args: tuple) -> np.ndarray:
    return np.clip(args[0] * np.arange(256), 0, 255).astype(np.uint8)


def _autocontrast_lut(h: np.ndarray) -> np.ndarray:
    """PIL ``ImageOps.autocontrast`` (cutoff 0) table of one channel histogram."""
    i = np.arange(256)
    nz = np.flatnonzero(h)
    lo, hi = (nz[0], nz[-1]) if nz.size else (0, 0)
    if hi <= lo:
        return i.astype(np.uint8)
    scale = 255.0 / (hi - lo)
    return np.clip((i * scale - lo * scale).astype(np.int64), 0, 255).astype(np.uint8)


def _equalize_lut(h: np.ndarray) -> np.ndarray:
    """PIL ``ImageOps.equalize`` table of one channel histogram."""
    nz = h[h > 0]
    step = (int(nz.sum()) - int(nz[-1])) // 255 if nz.size > 1 else 0
    if not step:
        return np.arange(256, dtype=np.uint8)
    before = np.concatenate([[0], np.cumsum(h)[:-1]])
    return np.clip((step // 2 + before) // step, 0, 255).astype(np.uint8)


def histogram_op(make: Callable[[np.ndarray], np.ndarray]) -> ColourOp:
    """A colour op mapping each frame's channels through a table made from their histograms."""

    def on_numpy(a: np.ndarray, args: tuple) -> np.ndarray:
        import cv2

        out = np.empty_like(a)
        for k in range(a.shape[0]):
            luts = [make(cv2.calcHist([a[k]], [c], None, [256], [0, 256]).ravel().astype(np.int64))
                    for c in range(3)]
            out[k] = cv2.LUT(a[k], np.stack(luts, axis=1).reshape(256, 1, 3))
        return out

    def on_torch(x: torch.Tensor, args: tuple) -> torch.Tensor:
        hist = _histograms(x)
        luts = [[make(hist[t, c]) for c in range(3)] for t in range(hist.shape[0])]
        return _lut_apply(x, np.stack(luts))

    return ColourOp(on_numpy, on_torch)


def _blend_numpy(degenerate: Callable[[np.ndarray], np.ndarray]
                 ) -> Callable[[np.ndarray, tuple], np.ndarray]:
    """PIL's ``ImageEnhance`` blend with ``cv2.addWeighted``, which rounds where PIL truncates:
    within 2 grey levels of PIL with ``cv2.cvtColor``'s grey weights (the tests check the bound)."""

    def op(a: np.ndarray, args: tuple) -> np.ndarray:
        import cv2

        f, out = float(args[0]), np.empty_like(a)
        for k in range(a.shape[0]):
            cv2.addWeighted(a[k], f, degenerate(a[k]), 1.0 - f, 0.0, dst=out[k])
        return out

    return op


def _grey_frame(frame: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def _smooth_frame(frame: np.ndarray) -> np.ndarray:
    import cv2

    deg = cv2.filter2D(frame, -1, _SMOOTH, borderType=cv2.BORDER_REPLICATE)
    deg[0], deg[-1], deg[:, 0], deg[:, -1] = frame[0], frame[-1], frame[:, 0], frame[:, -1]
    return deg


def _contrast_numpy(a: np.ndarray, args: tuple) -> np.ndarray:
    """Blend with the frame's rounded mean grey level: one table per frame."""
    import cv2

    f, out = float(args[0]), np.empty_like(a)
    for k in range(a.shape[0]):
        mean = int(cv2.cvtColor(a[k], cv2.COLOR_RGB2GRAY).mean() + 0.5)
        out[k] = cv2.LUT(a[k], np.clip(mean + f * (np.arange(256) - mean), 0, 255).astype(np.uint8))
    return out


def _contrast_torch(x: torch.Tensor, args: tuple) -> torch.Tensor:
    """PIL: blend with the frame's mean grey level, rounded; one table per frame."""
    i = np.arange(256)
    means = (_gray(x).float().mean(dim=(1, 2, 3)) + 0.5).floor().cpu().numpy()
    luts = np.clip(means[:, None] + args[0] * (i[None] - means[:, None]), 0, 255).astype(np.uint8)
    return _lut_apply(x, np.repeat(luts[:, None], 3, axis=1))


COLOUR_OPS: dict[str, ColourOp] = {
    "AutoContrast": histogram_op(_autocontrast_lut),
    "Equalize": histogram_op(_equalize_lut),
    "Invert": lut_op(_invert_lut),
    "Posterize": lut_op(_posterize_lut),
    "Solarize": lut_op(_solarize_lut),
    "SolarizeAdd": lut_op(_solarize_add_lut),
    "Brightness": lut_op(_brightness_lut),
    "Color": ColourOp(_blend_numpy(_grey_frame), lambda x, args: _blend(x, _gray(x), args[0])),
    "Contrast": ColourOp(_contrast_numpy, _contrast_torch),
    "Sharpness": ColourOp(_blend_numpy(_smooth_frame),
                          lambda x, args: _blend(x, _smooth(x), args[0])),
}
"""Colour op (base name, ``base_op``) -> its implementations (timm ``NAME_TO_OP``)."""


def _colour_op(name: str) -> ColourOp:
    if name not in COLOUR_OPS:
        raise ValueError(f"unknown colour op {name!r}")
    return COLOUR_OPS[name]


def colour_numpy(a: np.ndarray, name: str, args: tuple) -> np.ndarray:
    """CPU version of ``apply_colour`` on a contiguous uint8 ``[T, H, W, 3]`` array (OpenCV)."""
    return _colour_op(name).numpy(a, args)


def colour_torch(x: torch.Tensor, name: str, args: tuple) -> torch.Tensor:
    """Torch version of ``apply_colour`` (any device), PIL's integer arithmetic (truncating
    blends)."""
    return _colour_op(name).torch(x, args)


def apply_colour(x: torch.Tensor, name: str, args: tuple) -> torch.Tensor:
    """One colour op (base name, e.g. ``Color``) on a uint8 ``[T, H, W, 3]`` clip, frame by frame
    like PIL: CPU tensors through OpenCV/NumPy (``ColourOp.numpy``), others through torch
    (``ColourOp.torch``)."""
    if x.device.type == "cpu":
        return torch.from_numpy(colour_numpy(np.ascontiguousarray(x.numpy()), name, args))
    return colour_torch(x, name, args)


def apply_colour_ops(x: torch.Tensor, ops: ClipOps) -> torch.Tensor:
    """Every colour op of a draw, in order, on a uint8 ``[T, H, W, 3]`` clip."""
    for name, args in ops.colour:
        x = apply_colour(x, name, args)
    return x
