"""Stage files: a TSTL stage's (selector or expert) trainable parameters only, and sharing of the
frozen pre-trained backbones between the models of a run.

A stage file (``torch.save`` dict, format ``tstl-stage/v1``; files written as ``tstl-expert/v1``
read the same) holds:

* ``model`` / ``model_kwargs``: how to rebuild the network with ``tstl.models.create_model``;
* ``frozen``: where the frozen weights (B-CAST's CLIP/VideoMAE backbones) come from:
  ``{"checkpoints": [{"path", "sha256"}, ...]}``, loaded in order
  with ``tstl.models.load_checkpoint``;
* ``trainable``: ``model.trainable_state_dict()`` (about 45M of 217M parameters on B/16).

Only model-contract methods are used (``trainable_state_dict``/``load_trainable_state_dict``), so
any registered family works. TSTL's released selector/expert checkpoints are full CAST-layout state
dicts; they load with ``load_cast_checkpoint`` (a thin wrapper
over ``tstl.models.load_checkpoint``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tstl.models import create_model, load_checkpoint

logger = logging.getLogger(__name__)

STAGE_FILE_FORMAT = "tstl-stage/v1"
# the old name: runs trained before the rename load
_READABLE_FORMATS = (STAGE_FILE_FORMAT, "tstl-expert/v1")


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def frozen_sources_from_paths(paths: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """Describe frozen weights loaded from checkpoint files (path + hash, checked again at load)."""
    return {"checkpoints": [{"path": os.fspath(p), "sha256": file_sha256(p)} for p in paths]}


def build_with_frozen(model_name: str, model_kwargs: dict[str, Any], frozen: dict[str, Any],
                      verify_hashes: bool = True) -> nn.Module:
    """Create the model and fill its frozen weights from ``frozen`` (see module docstring)."""
    if "checkpoints" not in frozen:
        raise ValueError(f"frozen sources {sorted(frozen)}: expected {{'checkpoints': [...]}} (a "
                         "stage file written by train_two_stage)")
    model = create_model(model_name, **model_kwargs)
    for src in frozen["checkpoints"]:
        if verify_hashes and file_sha256(src["path"]) != src["sha256"]:
            raise ValueError(f"{src['path']}: SHA-256 differs from the one recorded when the stage "
                             "was trained; restore the original file or retrain the stage")
        # the head is trainable (restored from the stage file), so a source's head of another
        # size is skipped
        load_checkpoint(model, src["path"], strict=False, reinit_mismatched=("head.",))
    return model


def save_stage_file(model: nn.Module, path: str | os.PathLike, model_name: str,
                    model_kwargs: dict[str, Any],
                frozen: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Write ``model``'s trainable parameters plus the recipe to rebuild the frozen rest."""
    payload = {"format": STAGE_FILE_FORMAT, "model": model_name, "model_kwargs": dict(model_kwargs),
               "frozen": frozen,
               "trainable": {k: v.clone() for k, v in model.trainable_state_dict().items()},
               "extra": extra or {}}
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a killed run never leaves a half-written stage file behind


def read_stage_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a stage file's payload, with a clear error if it is not one."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") not in _READABLE_FORMATS:
        raise ValueError(f"{path}: not a {STAGE_FILE_FORMAT} stage file; full CAST checkpoints "
                         "load with load_cast_checkpoint")
    return payload


def load_stage_file(path: str | os.PathLike, trunk: nn.Module | None = None,
                    verify_hashes: bool = True) -> nn.Module:
    """Rebuild the model of a stage file (a selector or an expert).

    Args:
        path: Stage file written by ``save_stage_file``.
        trunk: An already built model with the same frozen sources; when given, the new model's
            frozen parameters become the trunk's tensors (no second copy in memory) and no frozen
            checkpoint is re-read.
        verify_hashes: Check frozen checkpoint hashes.
    """
    p = read_stage_file(path)
    if trunk is None:
        model = build_with_frozen(p["model"], p["model_kwargs"], p["frozen"], verify_hashes)
    else:
        model = create_model(p["model"], **p["model_kwargs"])
        share_frozen(trunk, model)
    expected = set(model.trainable_state_dict())
    got = set(p["trainable"])
    if expected != got:
        raise ValueError(f"{path}: trainable keys differ from {p['model']}: missing "
                         f"{sorted(expected - got)[:5]}, unexpected {sorted(got - expected)[:5]}")
    model.load_trainable_state_dict(p["trainable"], strict=True)
    return model.eval()


def share_frozen(reference: nn.Module, model: nn.Module) -> int:
    """Make ``model``'s frozen parameters the very same tensors as ``reference``'s.

    Returns:
        Number of parameters shared.
    """
    ref = dict(reference.named_parameters())
    shared = 0
    for name, p in list(model.named_parameters()):
        if p.requires_grad:
            continue
        if name not in ref or ref[name].shape != p.shape:
            raise ValueError(f"cannot share frozen parameter {name}: models differ")
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        setattr(owner, leaf, ref[name])
        shared += 1
    return shared


def load_cast_checkpoint(model_name: str, path: str | os.PathLike,
                         **model_kwargs: Any) -> nn.Module:
    """Load a full CAST-layout checkpoint (e.g. TSTL's released selector or an expert) into a
    new model."""
    model = create_model(model_name, **model_kwargs)
    load_checkpoint(model, path, strict=True)
    return model.eval()


def param_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, frozen)`` parameter counts (shared tensors counted once)."""
    seen: set[int] = set()
    t = f = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            t += p.numel()
        else:
            f += p.numel()
    return t, f
