"""Stage-2 plan: per-expert trainer overrides (data filtered by label from the same shards) and resume state."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tstl.twostage.groups import ClassGroups


def expert_dir(out_dir: str | os.PathLike, group: int) -> Path:
    """Run folder of expert ``group`` inside a TSTL run."""
    return Path(out_dir) / f"expert_{group:02d}"


def expert_file(out_dir: str | os.PathLike, group: int) -> Path:
    """Trainable-only expert checkpoint of ``group`` (written last, so its presence means 'finished')."""
    return expert_dir(out_dir, group) / "expert.pt"


def expert_overrides(groups: ClassGroups, group: int, out_dir: str | os.PathLike,
                     init: list[str] | None = None) -> dict[str, Any]:
    """Dotted trainer overrides that train expert ``group`` on its classes only.

    The loader keeps samples whose label is in the group (``data.labels``) and relabels them to local ids in
    group order (``data.remap_labels``), so the same shards are read and no video is copied.
    """
    members = list(groups.groups[group])
    out: dict[str, Any] = {
        "data.labels": members,
        "data.remap_labels": True,
        "model.num_classes": len(members),
        "out_dir": str(expert_dir(out_dir, group)),
    }
    if init:
        out["model.init"] = list(init)
    return out


def pending_experts(groups: ClassGroups, out_dir: str | os.PathLike) -> list[int]:
    """Experts still to train: finished ones (expert file present) are skipped; a half-trained one's run
    folder holds the trainer's own checkpoints, from which the trainer resumes."""
    return [g for g in range(groups.num_groups) if not expert_file(out_dir, g).exists()]
