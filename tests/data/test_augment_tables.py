"""Augmentations as tables: RandAugment ops, batch stages and worker-side clip transforms are each a
function plus a table entry (the worked examples of docs/loader.md, "Adding an augmentation"), and a
new entry leaves every other draw as it was."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tstl.data import DataConfig, build_train_loader
from tstl.data import augment as aug
from tstl.data import device as dev
from tstl.data import transforms as tfm
from tstl.data.seeds import derive_seed

LOADER = dict(num_frames=4, input_size=32, batch_size=2, eval_batch_size=4, num_workers=0,
              min_bad_check=1000, rand_augment="rand-m7-n4-mstd0.5-inc1",
              reprob=0.5, mixup=0.8, cutmix=1.0)


# ---- docs/loader.md worked examples ----------------------------------------------------------
def _gamma_lut(args: tuple) -> np.ndarray:
    return np.clip(255.0 * (np.arange(256) / 255.0) ** args[0] + 0.5, 0, 255).astype(np.uint8)


class BrightnessJitter:
    """Scale each clip of the normalised batch by its own factor in ``[1 - s, 1 + s]``."""

    name = "brightness_jitter"

    def __init__(self, strength: float) -> None:
        self.strength = strength

    def __call__(self, batch: dict, seed: int) -> dict:
        x = batch["video"]
        rng = np.random.default_rng(seed)
        f = 1.0 + rng.uniform(-self.strength, self.strength, size=x.shape[0])
        batch["video"] = x * torch.tensor(f, dtype=x.dtype, device=x.device).view(-1, 1, 1, 1, 1)
        return batch


def random_grayscale(p: float) -> tfm.ClipFn:
    def fn(clip: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if rng.random() >= p:
            return clip
        grey = (clip.float() @ torch.tensor([0.299, 0.587, 0.114])).round_().to(torch.uint8)
        return grey[..., None].expand_as(clip).contiguous()

    return fn


# ---- RandAugment op tables -------------------------------------------------------------------
def test_every_op_of_both_sets_has_its_table_entries() -> None:
    for name in aug.RAND_TRANSFORMS + aug.RAND_INCREASING_TRANSFORMS:
        assert name in aug.LEVEL_TO_ARG, name
        assert name in aug.GEOMETRIC_OPS or aug.base_op(name) in aug.COLOUR_OPS, name


def test_an_op_without_table_entries_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aug, "RAND_TRANSFORMS", [*aug.RAND_TRANSFORMS, "Gamma"])
    with pytest.raises(ValueError, match=r"\['Gamma'\] lack a LEVEL_TO_ARG"):
        aug.RandAugmentPolicy("rand-m9-n2")


def test_a_registered_colour_op_runs_on_the_worker_and_the_device_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(aug.LEVEL_TO_ARG, "Gamma", aug.LEVEL_TO_ARG["ColorIncreasing"])
    monkeypatch.setitem(aug.COLOUR_OPS, "Gamma", aug.lut_op(_gamma_lut))
    monkeypatch.setattr(aug, "RAND_TRANSFORMS", ["Gamma"])  # the only op, applied to every clip
    spec = "rand-m9-n1-p1.0"
    frames = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    cfg = DataConfig(input_size=32, rand_augment=spec, rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0))
    worker = tfm.TrainClipTransform(cfg)(frames, np.random.default_rng(3))
    # the clip's draws: the crop box, then RandAugment (no flip): redo them to read the clip's gamma
    rng = np.random.default_rng(3)
    tfm.rrc_params(32, 32, (1.0, 1.0), (1.0, 1.0), rng)
    (name, (gamma,)), = aug.RandAugmentPolicy(spec).draw(rng).ops
    assert name == "Gamma" and 0.1 <= gamma <= 1.9 and gamma != 1.0
    assert torch.equal(worker, torch.from_numpy(_gamma_lut((gamma,))[frames]))
    video = torch.from_numpy(np.broadcast_to(frames, (4, 2, 32, 32, 3)).copy())
    out = dev.DeviceRandAugment(spec)({"video": video.clone()}, seed=5)["video"]
    rng = np.random.default_rng(5)
    for i in range(4):
        (_, (g,)), = aug.RandAugmentPolicy(spec).draw(rng).ops
        assert torch.equal(out[i], torch.from_numpy(_gamma_lut((g,))[frames]))


# ---- batch stages ----------------------------------------------------------------------------
def test_stage_names_are_their_keys_and_their_seeds_differ() -> None:
    from timm.data import Mixup

    cfg = DataConfig(**LOADER)
    stages = dev.build_stages(cfg, train=True, device=torch.device("cpu"), augment_on="device",
                              mixup=Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=5))
    assert [s.name for s in stages] == list(dev.BATCH_STAGES)
    seeds = {dev.stage_seed(0, 1, (0, 7), s.name) for s in stages}
    assert len(seeds) == len(stages)
    # the stages older than the name keying draw as before (mixup: tag 4; RandAugment/erasing:
    # 10 + their former position, erasing's on the worker-augment path)
    for name, tag in (("mixup", 4), ("rand_augment", 11), ("erase", 12)):
        assert dev.stage_seed(3, 2, (1, 9), name) == derive_seed(3, 2, 1, 9, tag)
    evaluation = dev.build_stages(cfg, train=False, device=torch.device("cpu"), mixup=None,
                                  augment_on="worker")
    assert [s.name for s in evaluation] == ["to_device", "normalize"]


def test_a_stage_whose_name_is_not_its_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(dev.BATCH_STAGES, "jitter", lambda ctx: BrightnessJitter(0.2))
    with pytest.raises(ValueError, match="built a stage named 'brightness_jitter'"):
        dev.build_stages(DataConfig(**LOADER), train=True, device=torch.device("cpu"), mixup=None,
                         augment_on="worker")


def _epoch(root: Path, augment_on: str) -> list[dict]:
    ld = build_train_loader(DataConfig(**LOADER, augment_on=augment_on), root)
    return list(ld)


@pytest.mark.parametrize("augment_on", ["worker", "device"])
def test_inserting_a_batch_stage_leaves_the_other_stages_draws_unchanged(
        shardset: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, augment_on: str) -> None:
    root = shardset(8, [8])
    before = _epoch(root, augment_on)
    # the worked example's stage, inserted between normalisation and erasing; it only records its
    # seed, so any difference in the batches would come from the other stages' draws
    table = {}
    for name, build in dev.BATCH_STAGES.items():
        table[name] = build
        if name == "normalize":
            table["brightness_jitter"] = lambda ctx: BrightnessJitter(0.0) if ctx.train else None
    monkeypatch.setattr(dev, "BATCH_STAGES", table)
    calls: list[int] = []
    monkeypatch.setattr(BrightnessJitter, "__call__",
                        lambda self, batch, seed: calls.append(seed) or batch)
    after = _epoch(root, augment_on)
    assert len(calls) == len(after) == len(before) > 1
    for a, b in zip(before, after):
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["label"], b["label"])
        assert a["key"] == b["key"]
    assert before[0]["label"].dtype == torch.float32  # mixup ran: its draws were compared too


def test_the_example_batch_stage_draws_one_factor_per_clip() -> None:
    x = torch.ones(6, 3, 2, 4, 4)
    out = BrightnessJitter(0.2)({"video": x.clone()}, seed=1)["video"]
    factors = out[:, 0, 0, 0, 0]
    assert torch.equal(out, factors.view(-1, 1, 1, 1, 1).expand_as(out))
    assert ((factors >= 0.8) & (factors <= 1.2)).all() and len(set(factors.tolist())) == 6


# ---- the worker-side hook --------------------------------------------------------------------
def test_a_worker_transform_runs_after_the_fused_warp_with_its_own_draws(
        monkeypatch: pytest.MonkeyPatch) -> None:
    frames = np.random.default_rng(0).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
    cfg = DataConfig(input_size=32, rand_augment="rand-m7-n4-mstd0.5-inc1", flip=True)
    base = [tfm.TrainClipTransform(cfg)(frames, np.random.default_rng(k)) for k in range(24)]
    monkeypatch.setitem(tfm.CLIP_TRANSFORMS, "grayscale", lambda cfg: random_grayscale(0.5))
    monkeypatch.setitem(tfm.CLIP_TRANSFORMS, "off", lambda cfg: None)
    tf = tfm.TrainClipTransform(cfg)
    assert [name for name, _ in tf.extra] == ["grayscale"]
    grey = 0
    for k, b in enumerate(base):
        out = tf(frames, np.random.default_rng(k))
        expect = random_grayscale(1.0)(b, np.random.default_rng(0))
        # the crop/RandAugment draws are unchanged: the clip is the old one, or it in grey
        assert torch.equal(out, b) or torch.equal(out, expect)
        grey += torch.equal(out, expect)
        again = tf(frames, np.random.default_rng(k))
        assert torch.equal(out, again)
    assert 4 <= grey <= 20  # p = 0.5 over 24 clips


def test_transform_generators_are_keyed_by_name_and_leave_the_clip_generator_alone() -> None:
    rng = np.random.default_rng(11)
    a = tfm.transform_rng(rng, "a").random(4)
    assert np.array_equal(a, tfm.transform_rng(np.random.default_rng(11), "a").random(4))
    assert not np.array_equal(a, tfm.transform_rng(np.random.default_rng(11), "b").random(4))
    assert not np.array_equal(a, tfm.transform_rng(np.random.default_rng(12), "a").random(4))
    assert rng.random() == np.random.default_rng(11).random()  # nothing was drawn from rng itself
