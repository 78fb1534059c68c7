"""Load any supported checkpoint file into a model.

Reading and unwrapping the container is generic and lives here; mapping a foreign key layout (OpenAI CLIP,
VideoMAE, CAST, TimeSformer ``.pyth``, timm ViT) onto a model is the model family's job: every model class
implements ``convert_checkpoint(state_dict) -> Conversion``.

Everything is loaded with ``torch.load(weights_only=True)`` except OpenAI's TorchScript archives
(``ViT-B-16.pt``), which can only be read with ``torch.jit.load``.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

# Keys under which training scripts nest the weights: CAST/VideoMAE/TSTL ("model", "module"), DeepSpeed
# mp_rank_00_model_states.pt ("module"), PySlowFast/TimeSformer .pyth ("model_state"), generic ("state_dict").
_WRAPPER_KEYS = ("model_state", "module", "model", "state_dict")


@dataclass
class Conversion:
    """A checkpoint mapped onto a model's key layout.

    Attributes:
        state_dict: tensors under the model's own names.
        format: human-readable name of the detected layout (e.g. ``"openai-clip"``, ``"videomae-pretrain"``).
        explained_missing: model keys the checkpoint is known not to provide, with the reason
            (e.g. ``{"head.weight": "classes differ: head re-initialised"}``); prefixes ending in ``.`` match
            every key below them.
        explained_unexpected: checkpoint keys dropped on purpose, with the reason (e.g. the MAE decoder).
    """

    state_dict: dict[str, torch.Tensor]
    format: str
    explained_missing: dict[str, str] = field(default_factory=dict)
    explained_unexpected: dict[str, str] = field(default_factory=dict)


class ConvertsCheckpoints(Protocol):
    def convert_checkpoint(self, state_dict: dict[str, torch.Tensor]) -> Conversion: ...


@dataclass
class LoadReport:
    """What ``load_checkpoint`` did: the detected format and every key that did not load one to one."""

    path: str
    format: str
    loaded: int
    missing: list[str]
    unexpected: list[str]
    explained: dict[str, str]

    @property
    def unexplained(self) -> list[str]:
        return [k for k in self.missing + self.unexpected if _reason(k, self.explained) is None]


def _reason(key: str, explained: dict[str, str]) -> str | None:
    if key in explained:
        return explained[key]
    for pattern, why in explained.items():
        if pattern.endswith(".") and key.startswith(pattern):
            return why
    return None


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.split("/", 1)[-1].startswith("code/") for name in zf.namelist())


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file and return its flat tensor state dict, unwrapped from training-script containers."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if _is_torchscript(path):
        # OpenAI's CLIP releases are TorchScript archives; they cannot be read with weights_only=True.
        logger.info("%s: TorchScript archive, reading with torch.jit.load", path)
        return {k: v for k, v in torch.jit.load(path, map_location="cpu").state_dict().items()}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path}: cannot be read as a weights-only torch checkpoint ({type(e).__name__}: {e}). "
            "Only tensors, numbers and strings are accepted; re-save the state dict with torch.save(model.state_dict())."
        ) from e
    while isinstance(obj, dict):
        inner = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = obj[inner]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: no state dict found (expected a mapping of names to tensors)")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path}: the checkpoint holds no tensors at its top level or under {_WRAPPER_KEYS}")
    return tensors


def _select_head_rows(conv: Conversion, own: dict[str, torch.Tensor], rows: list[int], total: int | None,
                      path) -> None:
    for k in ("head.weight", "head.bias"):
        v = conv.state_dict.get(k)
        if v is None or k not in own or v.shape == own[k].shape:
            continue
        if total is not None and v.shape[0] != total:
            logger.warning("%s: its head has %d classes, this dataset %d: %s is not taken from it", path,
                           v.shape[0], total, k)
            continue
        if len(rows) != own[k].shape[0] or max(rows) >= v.shape[0]:
            raise ValueError(f"{path}: cannot take rows {rows[:8]} of a {v.shape[0]}-class head for a "
                             f"{own[k].shape[0]}-class model")
        conv.state_dict[k] = v[rows]
        logger.info("%s: %s initialised from the checkpoint's rows %s", path, k, rows)


def load_checkpoint(model: nn.Module, path: str | os.PathLike, *, strict: bool = True,
                    reinit_mismatched: tuple[str, ...] = (), head_rows: list[int] | None = None,
                    head_rows_of: int | None = None, adapters=()) -> LoadReport:
    """Detect the format of ``path``, map it onto ``model`` and load it.

    Args:
        model: a model whose class implements ``convert_checkpoint``.
        path: checkpoint file (any supported format).
        strict: raise if a key is missing or unexpected without an explanation from the converter.
        reinit_mismatched: key prefixes (e.g. ``("head.",)``) whose tensors are skipped, and keep the model's
            initialisation, when their shape differs: fine-tuning from a checkpoint of another number of classes
            (as CAST's fine-tuning does). Any other shape mismatch is an error.
        head_rows: classes of the checkpoint's head (``head.weight``/``head.bias`` rows) that become this model's
            classes, in order, when the head sizes differ: a TSTL expert starts from its group's rows of a CAST
            classifier instead of a new head.
        head_rows_of: with ``head_rows``: the number of classes the checkpoint's head must have for its rows to be
            taken (the dataset's); a head of another size (another dataset's classifier) is not used.

    Returns:
        A ``LoadReport`` with the missing and unexpected keys (also logged).
    """
    state_dict = read_checkpoint(path)
    if not hasattr(model, "convert_checkpoint"):
        raise TypeError(f"{type(model).__name__} does not implement convert_checkpoint()")
    conv = model.convert_checkpoint(state_dict)
    own = model.state_dict()
    if head_rows is not None:
        _select_head_rows(conv, own, list(head_rows), head_rows_of, path)
    for adapt in adapters:  # state-dict adapters (conversion, own) -> None, e.g. TSTL's head-row selection
        adapt(conv, own)
    for k in [k for k, v in conv.state_dict.items() if k.startswith(reinit_mismatched) and k in own
              and v.shape != own[k].shape]:
        logger.warning("%s: %s has shape %s, the model %s: kept at its initialisation", path, k,
                    tuple(conv.state_dict[k].shape), tuple(own[k].shape))
        del conv.state_dict[k]
        conv.explained_missing[k] = "shape differs (another number of classes): re-initialised"
    shape_errors = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in conv.state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if shape_errors:
        raise ValueError(f"{path} ({conv.format}): shape mismatch:\n  " + "\n  ".join(shape_errors))
    result = model.load_state_dict(conv.state_dict, strict=False)
    explained = {**conv.explained_missing, **conv.explained_unexpected}
    unexpected = sorted(set(result.unexpected_keys) | set(conv.explained_unexpected))
    report = LoadReport(
        path=os.fspath(path),
        format=conv.format,
        loaded=len(conv.state_dict) - len(result.unexpected_keys),
        missing=sorted(result.missing_keys),
        unexpected=unexpected,
        explained=explained,
    )
    logger.info("%s: %s, %d tensors loaded, %d missing, %d unexpected", path, conv.format, report.loaded,
                len(report.missing), len(report.unexpected))
    for key in report.missing + report.unexpected:
        why = _reason(key, explained)
        logger.debug("  %s: %s", key, why or "UNEXPLAINED")
    if strict and report.unexplained:
        raise ValueError(
            f"{path} ({conv.format}): {len(report.unexplained)} keys neither load nor are explained, e.g. "
            f"{report.unexplained[:8]}. Pass strict=False to load anyway."
        )
    return report
