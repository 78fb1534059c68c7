"""The run folder of a TSTL run and the training config of each stage.

Layout under ``out_dir``::

    groups.json            the class groups, pinned at the first run (a rerun with other groups is refused)
    trunk.pt               only when no checkpoint is given: the run's random initial weights, so that every
                           stage starts from (and shares) the same frozen experts
    selector/              the stage-1 trainer's run folder; selector.pt (trainable-only) written last
    expert_NN/             the stage-2 trainer's run folder of group NN; expert.pt written last
    eval/                  the routed evaluation report

A stage whose ``*.pt`` exists is finished and skipped; a stage without it resumes from its trainer's checkpoints.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tstl.train.config import TrainConfig
from tstl.twostage.config import TSTLConfig, with_overrides
from tstl.twostage.groups import ClassGroups


def selector_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "selector"


def selector_file(out_dir: str | os.PathLike) -> Path:
    """Trainable-only selector checkpoint (written last, so its presence means 'stage 1 finished')."""
    return selector_dir(out_dir) / "selector.pt"


def expert_dir(out_dir: str | os.PathLike, group: int) -> Path:
    """Run folder of expert ``group`` inside a TSTL run."""
    return Path(out_dir) / f"expert_{group:02d}"


def expert_file(out_dir: str | os.PathLike, group: int) -> Path:
    """Trainable-only expert checkpoint of ``group`` (written last, so its presence means 'finished')."""
    return expert_dir(out_dir, group) / "expert.pt"


def pending_experts(groups: ClassGroups, out_dir: str | os.PathLike) -> list[int]:
    """Experts still to train: finished ones (expert file present) are skipped; a half-trained one's run
    folder holds the trainer's own checkpoints, from which the trainer resumes."""
    return [g for g in range(groups.num_groups) if not expert_file(out_dir, g).exists()]


# Stage defaults the user may change (tstl.selector / tstl.expert): the routed evaluation replaces the per-stage
# multi-view test, so it is off unless asked for.
_STAGE_DEFAULTS: dict[str, Any] = {"test_at_end": False}


def _stage(cfg: TSTLConfig, stage: str, out: Path, data: dict[str, Any], model: dict[str, Any],
           trunk: Path | None) -> TrainConfig:
    base = cfg.stage_base(stage, _STAGE_DEFAULTS)
    init = ([str(trunk)] if trunk else []) + list(base.model.init) + list(cfg.tstl.init)
    fixed = {"out_dir": str(out), "data": data, "model": {**model, "init": init}}
    return with_overrides(base, fixed, f"tstl {stage} stage")


def selector_config(cfg: TSTLConfig, groups: ClassGroups, trunk: Path | None = None) -> TrainConfig:
    """Stage 1: the run's model with a head over groups, trained on class -> group labels from the same shards."""
    data = {"label_map": [int(g) for g in groups.class_to_group]}
    return _stage(cfg, "selector", selector_dir(cfg.out_dir), data, {"num_classes": groups.num_groups}, trunk)


def expert_config(cfg: TSTLConfig, groups: ClassGroups, group: int, trunk: Path | None = None) -> TrainConfig:
    """Stage 2, expert ``group``: the loader keeps the group's samples of the same shards (no copy) and relabels
    them to local ids in group order; a head over the group's classes starts from their rows of an ``init``
    classifier over all classes (e.g. CAST's), so the expert starts as that model restricted to its group."""
    members = [int(c) for c in groups.groups[group]]
    data = {"labels": members, "remap_labels": True}
    model = {"num_classes": len(members), "head_rows": members}
    stage = _stage(cfg, "expert", expert_dir(cfg.out_dir, group), data, model, trunk)
    if cfg.tstl.expert_split:  # a per-group subset: still filtered by label, which keeps every sample of it
        stage = with_overrides(stage, {"train_split": cfg.tstl.expert_split.format(group=group)}, "tstl.expert_split")
    return stage
