"""Batch stages run by ``ShardLoader`` in the training process, on the training device: the rest of
augmentation.

Workers hand uint8 clips ``[B, T, S, S, 3]`` (channels last, a quarter of the float32 bytes). The
loader applies the stages ``build_stages`` makes to every batch, in order, webdataset-style. A stage
is a callable ``(batch, seed) -> batch`` with a stable ``name``; its seed is
``stage_seed(seed, epoch, (position,), name)`` (the position of the batch's first sample in the
epoch's order), keyed by the name, not by the stage's position, so inserting a stage leaves the
other stages' draws unchanged, resumed runs repeat every draw exactly and the draws depend neither
on the device nor on the number of ranks and workers.

``BATCH_STAGES`` is the table, in order. Training: ``to_device`` (pinned, non-blocking copy) ->
``rand_augment`` (``DeviceRandAugment``, ``augment_on: device`` only) -> ``normalize`` (uint8
channels-last -> float ``[B, 3, T, S, S]``) -> ``erase`` (timm RandomErasing, pixel mode, one box
per clip on every frame) -> ``mixup`` (timm ``Mixup``, the box on every frame). Evaluation:
``to_device`` -> ``normalize``. Adding a batch stage is a class (``name`` + ``__call__``) and one
table entry (docs/loader.md, "Adding an augmentation").
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import mixup_target

from tstl.data.augment import FILL, RandAugmentPolicy, apply_colour_ops, compose, fill_mask
from tstl.data.config import DataConfig
from tstl.data.seeds import derive_seed


class BatchStage(Protocol):
    """A batch stage ``(batch, seed) -> batch``; ``name`` keys its random draws (``stage_seed``)."""

    name: str

    def __call__(self, batch: dict, seed: int) -> dict: ...


class ToDevice:
    """Move ``video`` and ``label`` to the device (non-blocking: the DataLoader pins batches for
    CUDA)."""

    name = "to_device"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, batch: dict, seed: int) -> dict:
        batch["video"] = batch["video"].to(self.device, non_blocking=True)
        label = batch["label"]  # a tensor, or head -> tensor for a multi-head set
        batch["label"] = ({h: y.to(self.device, non_blocking=True) for h, y in label.items()}
                          if isinstance(label, dict) else label.to(self.device, non_blocking=True))
        return batch


def warp_batch(x: torch.Tensor, maps: list[np.ndarray], fills: list[np.ndarray]) -> torch.Tensor:
    """Bicubic warp of uint8 clips ``[b, T, S, S, 3]``, one output -> input 3x3 pixel map per clip
    for all frames.

    Pixels in a clip's ``fills`` mask (``augment.fill_mask``) get the fill colour (128); elsewhere
    bicubic reads clamp to the edge (like PIL's ``transform``), so a clip's border is not blended
    with the fill.
    """
    b, t, h, w, _ = x.shape
    n = np.array([[2.0 / w, 0.0, -1.0], [0.0, 2.0 / h, -1.0], [0.0, 0.0, 1.0]])
    theta = torch.tensor(np.stack([n @ m @ np.linalg.inv(n) for m in maps])[:, :2],
                         dtype=torch.float32, device=x.device)
    xf = x.permute(0, 1, 4, 2, 3).reshape(b, t * 3, h, w).float()
    grid = F.affine_grid(theta, [b, t * 3, h, w], align_corners=False)
    y = F.grid_sample(xf, grid, mode="bicubic", padding_mode="border", align_corners=False)
    # [b, 1, h, w]
    outside = torch.from_numpy(np.stack(fills)[:, None]).to(x.device, non_blocking=True)
    y = y.masked_fill_(outside, float(FILL)).round_().clamp_(0, 255).to(torch.uint8)
    return y.view(b, t, 3, h, w).permute(0, 1, 3, 4, 2)


class DeviceRandAugment:
    """RandAugment on the device: per-clip draws (same distribution as the worker path), one batched
    warp."""

    name = "rand_augment"

    def __init__(self, spec: str) -> None:
        self.policy = RandAugmentPolicy(spec)

    def __call__(self, batch: dict, seed: int) -> dict:
        x = batch["video"]
        b, _, h, w, _ = x.shape
        rng = np.random.default_rng(seed)
        draws = [self.policy.draw(rng) for _ in range(b)]
        geo = [i for i, d in enumerate(draws) if d.geometric]
        out = x.clone()
        if geo:
            maps = [draws[i].maps(w, h) for i in geo]
            out[geo] = warp_batch(x[geo], [compose(m) for m in maps],
                                  [fill_mask(m, w, h) for m in maps])
        for i, d in enumerate(draws):
            if d.colour:
                out[i] = apply_colour_ops(out[i], d)
        batch["video"] = out
        return batch


class Normalize:
    """uint8 ``[B, T, H, W, 3]`` -> float32 ``[B, 3, T, H, W]``, ``(x / 255 - mean) / std``."""

    name = "normalize"

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, 3, 1, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1, 1)

    def __call__(self, batch: dict, seed: int) -> dict:
        x = batch["video"]
        if x.device.type == "cpu":
            # Transpose while still uint8 and cast with NumPy: torch's CPU uint8 -> float cast and
            # out-of-place arithmetic measured 5-7x slower here.
            xf = torch.from_numpy(
                np.ascontiguousarray(x.numpy().transpose(0, 4, 1, 2, 3)).astype(np.float32))
        else:
            xf = x.permute(0, 4, 1, 2, 3).contiguous().float()
        batch["video"] = xf.mul_(self.scale.to(x.device)).add_(self.shift.to(x.device))
        return batch


class Erase:
    """timm ``RandomErasing`` (``mode='pixel'``, one box) per clip, the same box on every frame.

    Box draw as timm's ``_erase`` (probability, area in [0.02, 1/3], log-uniform aspect in [0.3,
    1/0.3], 10 attempts); per-pixel normal noise, different on every frame and channel (timm on the
    ``[3T, H, W]`` view).
    """

    name = "erase"

    def __init__(self, probability: float, min_area: float = 0.02, max_area: float = 1 / 3,
                 min_aspect: float = 0.3) -> None:
        self.probability, self.min_area, self.max_area = probability, min_area, max_area
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def boxes(self, b: int, h: int, w: int,
              rng: np.random.Generator) -> list[tuple[int, int, int, int] | None]:
        """``(top, left, eh, ew)`` per clip, or None where it is not erased."""
        out: list[tuple[int, int, int, int] | None] = []
        for _ in range(b):
            box = None
            if rng.random() <= self.probability:
                for _attempt in range(10):
                    area = rng.uniform(self.min_area, self.max_area) * h * w
                    aspect = math.exp(rng.uniform(*self.log_aspect))
                    eh, ew = (int(round(math.sqrt(area * aspect))),
                              int(round(math.sqrt(area / aspect))))
                    if ew < w and eh < h:
                        box = (int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1)),
                               eh, ew)
                        break
            out.append(box)
        return out

    def __call__(self, batch: dict, seed: int) -> dict:
        x = batch["video"]  # float [B, 3, T, H, W]
        b, c, t, h, w = x.shape
        rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        for i, box in enumerate(self.boxes(b, h, w, rng)):
            if box is not None:
                top, left, eh, ew = box
                # drawn on the CPU: same values on every device
                noise = torch.randn((c, t, eh, ew), generator=gen)
                x[i, :, :, top:top + eh, left:left + ew] = noise.to(x.device, non_blocking=True)
        return batch


@contextlib.contextmanager
def numpy_seeded(seed: int) -> Iterator[None]:
    """Seed NumPy's global generator (timm's Mixup draws from it) for the block, then restore it."""
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


class MixupCutmix:
    """timm ``Mixup`` on the batch; the clip is viewed as ``[B, 3T, H, W]`` so a CutMix box spans
    every frame."""

    name = "mixup"

    def __init__(self, mixup) -> None:
        self.mixup = mixup

    def __call__(self, batch: dict, seed: int) -> dict:
        video = batch["video"]
        b, c, t, h, w = video.shape
        if b % 2:
            raise ValueError(f"mixup needs an even batch, got {b}")
        with numpy_seeded(seed):
            _, batch["label"] = self.mixup(video.view(b, c * t, h, w), batch["label"])
        return batch


class MultiHeadMixup(Mixup):
    """timm's ``Mixup`` for a multi-head set: one draw of lambda (and box) per batch mixes the
    clips, and every head's labels are mixed with that same lambda, each with label smoothing over
    its own classes (CAST ``util_tools/mixup.py:218-221``: ``mixup_target`` of the noun and the
    verb with one ``lam``). Called as timm's (``(x, targets) -> (x, soft targets)``), so
    ``MixupCutmix`` runs it unchanged; ``targets`` and the result are dicts head -> tensor.
    """

    def __init__(self, heads: Mapping[str, int], **kwargs) -> None:
        super().__init__(num_classes=max(heads.values()), **kwargs)
        self.heads = dict(heads)

    def __call__(self, x: torch.Tensor, target: Mapping[str, torch.Tensor]  # type: ignore[override]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if len(x) % 2:
            raise ValueError(f"mixup needs an even batch, got {len(x)}")
        mix = {"elem": self._mix_elem, "pair": self._mix_pair}.get(self.mode, self._mix_batch)
        lam = mix(x)
        return x, {h: mixup_target(target[h], n, lam, self.label_smoothing)
                   for h, n in self.heads.items()}


# ---- the stage table -----------------------------------------------------------------------------
@dataclass(frozen=True)
class StageContext:
    """What a stage builder may read: the loader's config and the batches it makes."""

    cfg: DataConfig
    train: bool
    """Training batches (augmentation, mixup) or evaluation batches."""
    device: torch.device
    """The training device the stages run on (``ShardLoader.to``)."""
    mixup: Mixup | None
    """The loader's timm ``Mixup`` (it needs the shard set's number of classes), None when off."""
    augment_on: str
    """``worker`` or ``device``: ``data.augment_on`` resolved against ``device``."""


StageBuilder = Callable[[StageContext], "BatchStage | None"]
"""Makes a stage for a loader, or None where the stage is off for it."""


def _rand_augment(ctx: StageContext) -> DeviceRandAugment | None:
    on = ctx.train and ctx.augment_on == "device" and ctx.cfg.rand_augment
    return DeviceRandAugment(ctx.cfg.rand_augment) if on else None


def _erase(ctx: StageContext) -> Erase | None:
    return Erase(ctx.cfg.reprob) if ctx.train and ctx.cfg.reprob > 0 else None


BATCH_STAGES: dict[str, StageBuilder] = {
    "to_device": lambda ctx: ToDevice(ctx.device),
    "rand_augment": _rand_augment,
    "normalize": lambda ctx: Normalize(ctx.cfg.mean, ctx.cfg.std),
    "erase": _erase,
    "mixup": lambda ctx: MixupCutmix(ctx.mixup) if ctx.mixup is not None else None,
}
"""Stage name -> builder, in the order the stages run; a stage's ``name`` is its key here."""


def build_stages(cfg: DataConfig, *, train: bool, device: torch.device, mixup: Mixup | None,
                 augment_on: str) -> list[BatchStage]:
    """The batch stages of a loader, in ``BATCH_STAGES`` order, leaving out those that are off."""
    ctx = StageContext(cfg, train, device, mixup, augment_on)
    stages = []
    for name, build in BATCH_STAGES.items():
        stage = build(ctx)
        if stage is None:
            continue
        if stage.name != name:  # the name keys the stage's draws: two stages must never share one
            raise ValueError(f"BATCH_STAGES[{name!r}] built a stage named {stage.name!r}")
        stages.append(stage)
    return stages


SEED_TAGS: dict[str, int] = {"mixup": 4, "rand_augment": 11, "erase": 12}
"""Stages older than the name keying keep the seed tag they drew with, 10 + their former position
for all but mixup (its 4): RandAugment 11, erasing 12 (its position on the worker-augment path, the
CPU default; with ``augment_on: device`` it was 13, so its draws there changed once). Every other
stage's tag is the CRC-32 of its name."""


def stage_seed(seed: int, epoch: int, step_key: tuple[int, ...], name: str) -> int:
    """The seed of stage ``name`` for one batch: ``step_key`` says which batch (the loader gives the
    position of its first sample in the epoch's order, so the draw is the same on any layout). Keyed
    by the name (a stable hash, not Python's salted ``hash``), so adding or moving a stage changes
    no other stage's draws."""
    tag = SEED_TAGS.get(name, zlib.crc32(name.encode()))
    return derive_seed(seed, epoch, *step_key, tag)
