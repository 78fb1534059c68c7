"""Expert checkpoints that hold only trainable parameters, and sharing of the frozen trunk between experts.

An expert file (``torch.save`` dict, format ``tstl-expert/v1``) holds:

* ``model`` / ``model_kwargs``: how to rebuild the network with ``tstl.models.create_model``;
* ``frozen``: where the frozen CLIP/VideoMAE weights come from: a list of ``{"path", "sha256"}`` checkpoints
  loaded in order with ``tstl.models.load_checkpoint``, or ``{"random_init_seed": s}`` (demo/tests: the frozen
  weights are whatever ``create_model`` draws after ``torch.manual_seed(s)``);
* ``trainable``: ``model.trainable_state_dict()`` (about 45M of 217M parameters on B/16).

TSTL's released selector/expert checkpoints are full CAST-layout state dicts; they load with
``load_cast_checkpoint`` (a thin wrapper over ``tstl.models.load_checkpoint``).
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

EXPERT_FORMAT = "tstl-expert/v1"


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
    if "random_init_seed" in frozen:
        torch.manual_seed(int(frozen["random_init_seed"]))
        return create_model(model_name, **model_kwargs)
    model = create_model(model_name, **model_kwargs)
    for src in frozen.get("checkpoints", []):
        if verify_hashes and file_sha256(src["path"]) != src["sha256"]:
            raise ValueError(f"{src['path']}: SHA-256 differs from the one recorded when the expert was trained; "
                             "restore the original file or retrain the expert")
        # the head is trainable (restored from the expert file), so a source's head of another size is skipped
        load_checkpoint(model, src["path"], strict=False, reinit_mismatched=("head.",))
    return model


def save_expert(model: nn.Module, path: str | os.PathLike, model_name: str, model_kwargs: dict[str, Any],
                frozen: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Write ``model``'s trainable parameters plus the recipe to rebuild the frozen rest."""
    payload = {"format": EXPERT_FORMAT, "model": model_name, "model_kwargs": dict(model_kwargs),
               "frozen": frozen, "trainable": {k: v.clone() for k, v in model.trainable_state_dict().items()},
               "extra": extra or {}}
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a killed run never leaves a half-written expert behind


def read_expert(path: str | os.PathLike) -> dict[str, Any]:
    """Read an expert file's payload, with a clear error if it is not one."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != EXPERT_FORMAT:
        raise ValueError(f"{path}: not a {EXPERT_FORMAT} expert file; full CAST checkpoints load with "
                         "load_cast_checkpoint")
    return payload


def load_expert(path: str | os.PathLike, trunk: nn.Module | None = None, verify_hashes: bool = True) -> nn.Module:
    """Rebuild an expert.

    Args:
        path: Expert file written by ``save_expert``.
        trunk: An already built model with the same frozen sources; when given, the new expert's frozen
            parameters become the trunk's tensors (no second copy in memory) and no frozen checkpoint is re-read.
        verify_hashes: Check frozen checkpoint hashes.
    """
    p = read_expert(path)
    if trunk is None:
        model = build_with_frozen(p["model"], p["model_kwargs"], p["frozen"], verify_hashes)
    else:
        model = create_model(p["model"], **p["model_kwargs"])
        share_frozen(trunk, model)
    expected = set(model.trainable_state_dict())
    got = set(p["trainable"])
    if expected != got:
        raise ValueError(f"{path}: trainable keys differ from {p['model']}: missing {sorted(expected - got)[:5]}, "
                         f"unexpected {sorted(got - expected)[:5]}")
    model.load_state_dict(p["trainable"], strict=False)
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


def load_cast_checkpoint(model_name: str, path: str | os.PathLike, **model_kwargs: Any) -> nn.Module:
    """Load a full CAST-layout checkpoint (e.g. TSTL's released selector or an expert) into a new model."""
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
