"""The run folder of a TSTL run and the setup of each stage (``Stage``): its training config, the
loader's label map and the state-dict adapters its initial weights load with.

Layout under ``out_dir``::

    groups.json            the class groups, pinned at the first run (a rerun with other groups is
                           refused)
    selector/              the stage-1 trainer's run folder; selector.pt (stage file,
                           trainable-only) written last
    expert_NN/             the stage-2 trainer's run folder of group NN; expert.pt (stage file)
                           written last
    eval/                  the routed evaluation report

A stage whose ``*.pt`` exists is finished and skipped; a stage without it resumes from its
trainer's checkpoints.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tstl.models.checkpoint import Conversion, StateDictAdapter
from tstl.train.config import TrainConfig
from tstl.twostage.config import TSTLConfig, with_overrides
from tstl.twostage.groups import ClassGroups

logger = logging.getLogger(__name__)


@dataclass
class Stage:
    """One stage of a TSTL run: what
    ``Trainer(config, label_map=..., weight_adapters=...)`` gets."""

    config: TrainConfig
    label_map: dict[int, int]
    """The loader's relabelling (class -> group for the selector, a group's classes -> 0..k-1 for
    an expert)."""
    adapters: tuple[StateDictAdapter, ...] = field(default_factory=tuple)
    """State-dict adapters for the ``model.init`` checkpoints (an expert's head rows)."""


def head_rows(rows: Sequence[int], dataset_classes: int) -> StateDictAdapter:
    """State-dict adapter: a model head of ``len(rows)`` classes starts from those rows (classes, in
    order) of a checkpoint head over the ``dataset_classes`` classes of this dataset (e.g. a CAST
    classifier), so a TSTL expert starts as that model restricted to its group. A checkpoint head of
    another size (another dataset's) is not taken (warning); heads of the model's own size load as
    they are."""
    rows = [int(r) for r in rows]

    def adapt(conv: Conversion, own: dict[str, torch.Tensor]) -> None:
        for k in ("head.weight", "head.bias"):
            v = conv.state_dict.get(k)
            if v is None or k not in own or v.shape == own[k].shape:
                continue
            if v.shape[0] != dataset_classes:
                logger.warning("%s checkpoint: its head has %d classes, this dataset %d: %s is not "
                               "taken from it", conv.format, v.shape[0], dataset_classes, k)
                continue
            if len(rows) != own[k].shape[0] or max(rows) >= v.shape[0]:
                raise ValueError(f"{conv.format} checkpoint: cannot take rows {rows[:8]} of a "
                                 f"{v.shape[0]}-class head for a {own[k].shape[0]}-class model")
            conv.state_dict[k] = v[rows]
            logger.info("%s checkpoint: %s initialised from its rows %s", conv.format, k, rows)

    return adapt


def selector_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "selector"


def selector_file(out_dir: str | os.PathLike) -> Path:
    """The selector's stage file (trainable-only, written last, so its presence means 'stage
    1 finished')."""
    return selector_dir(out_dir) / "selector.pt"


def expert_dir(out_dir: str | os.PathLike, group: int) -> Path:
    """Run folder of expert ``group`` inside a TSTL run."""
    return Path(out_dir) / f"expert_{group:02d}"


def expert_file(out_dir: str | os.PathLike, group: int) -> Path:
    """The stage file (trainable-only) of expert ``group`` (written last, so its presence
    means 'finished')."""
    return expert_dir(out_dir, group) / "expert.pt"


def pending_experts(groups: ClassGroups, out_dir: str | os.PathLike) -> list[int]:
    """Experts still to train: finished ones (stage file present) are skipped; a half-trained one's
    run folder holds the trainer's own checkpoints, from which the trainer resumes."""
    return [g for g in range(groups.num_groups) if not expert_file(out_dir, g).exists()]


# Stage defaults the user may change (tstl.selector / tstl.expert): the routed evaluation replaces
# the per-stage multi-view test, so it is off unless asked for.
_STAGE_DEFAULTS: dict[str, Any] = {"test_at_end": False}


def _stage(cfg: TSTLConfig, stage: str, out: Path, model: dict[str, Any]) -> TrainConfig:
    base = cfg.stage_base(stage, _STAGE_DEFAULTS)
    init = list(base.model.init) + list(cfg.tstl.init)
    fixed = {"out_dir": str(out), "model": {**model, "init": init}}
    return with_overrides(base, fixed, f"tstl {stage} stage")


def selector_stage(cfg: TSTLConfig, groups: ClassGroups) -> Stage:
    """Stage 1: the run's model with a head over groups, trained on class -> group labels from the
    same shards."""
    config = _stage(cfg, "selector", selector_dir(cfg.out_dir), {"num_classes": groups.num_groups})
    return Stage(config, {c: int(g) for c, g in enumerate(groups.class_to_group)})


def expert_stage(cfg: TSTLConfig, groups: ClassGroups, group: int) -> Stage:
    """Stage 2, expert ``group``: the loader keeps the group's samples of the same shards (no copy)
    and relabels them to local ids in group order; a head over the group's classes starts from their
    rows of an ``init`` classifier over all classes (e.g. CAST's), so the expert starts as that
    model restricted to its group."""
    members = [int(c) for c in groups.groups[group]]
    config = _stage(cfg, "expert", expert_dir(cfg.out_dir, group), {"num_classes": len(members)})
    # a per-group subset: still filtered by label, which keeps every sample of it
    if cfg.tstl.expert_split:
        config = with_overrides(config, {"train_split": cfg.tstl.expert_split.format(group=group)},
                                "tstl.expert_split")
    return Stage(config, {c: i for i, c in enumerate(members)},
                 (head_rows(members, groups.num_classes),))
