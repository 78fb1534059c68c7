"""Load any supported checkpoint file into a model, safely.

Reading and unwrapping the container is generic and lives here; mapping a foreign key layout (OpenAI CLIP,
VideoMAE, CAST, TimeSformer ``.pyth``, timm ViT) onto a model is the model family's job: every model is a
``VideoClassifier`` and implements ``convert_checkpoint(state_dict) -> Conversion``.

Files are read with ``torch.load(weights_only=True)`` plus an explicit allow-list (``SAFE_GLOBALS``) of the plain
Python types the official training scripts pickle next to the weights. What the reference ``save_model``/engine code
writes (checked in the reference repositories; tests/models/test_checkpoint.py builds each layout):

* VideoMAE / CAST / TSTL torch-amp path (``utils.save_model``): ``{"model", "optimizer", "epoch", "scaler",
  "args"}`` (+ ``"model_ema"``); ``args`` is the run's ``argparse.Namespace`` (strings, numbers, bools, None,
  tuples, lists), the optimizer and scaler states are tensors and plain containers.
* Their DeepSpeed path (``model.save_checkpoint``): ``mp_rank_00_model_states.pt`` with ``module``,
  ``buffer_names``, ``optimizer`` (DeepSpeed's FP16 optimizer state: numbers, tensors, dicts), ``param_shapes``
  (``torch.Size``), ``sparse_tensor_module_names`` (a set), step counters, ``ds_config`` (the config path or
  dict), ``ds_version`` and the client state ``{"epoch": ...}``: no global beyond torch's own allow-list.
* TimeSformer / PySlowFast ``.pyth``: ``{"epoch", "model_state", "optimizer_state", "cfg"}``, ``cfg`` a YAML string.

So ``argparse.Namespace`` is the only global added. A file whose pickle names any other global is refused
(``UntrustedCheckpointError``, naming the file and the globals) unless the user trusts it: ``trusted=True``, the
file listed in a ``model.trusted_checkpoints`` config list passed as ``trusted=[...]``, or listed in the environment
variable ``TSTL_TRUSTED_CHECKPOINTS`` (paths separated by ``os.pathsep``). A trusted file that still fails the safe
load is read with ``weights_only=False`` and a WARNING naming the file and its globals; never silently.

OpenAI's TorchScript archives (``ViT-B-16.pt``) can only be read with ``torch.jit.load``.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from tstl.models.contract import Conversion, VideoClassifier

__all__ = ["SAFE_GLOBALS", "TRUSTED_ENV", "Conversion", "LoadReport", "StateDictAdapter", "UntrustedCheckpointError",
           "is_trusted", "load_checkpoint", "read_checkpoint"]

logger = logging.getLogger(__name__)

# Keys under which training scripts nest the weights: CAST/VideoMAE/TSTL ("model", "module"), DeepSpeed
# mp_rank_00_model_states.pt ("module"), PySlowFast/TimeSformer .pyth ("model_state"), generic ("state_dict").
_WRAPPER_KEYS = ("model_state", "module", "model", "state_dict")

# Globals a weights-only load may construct beyond torch's own (tensors, dtypes, torch.Size, OrderedDict, set):
# the run's argparse.Namespace, which CAST's, TSTL's and VideoMAE's save_model store under "args".
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)

_ALLOWED = tuple(f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS)

TRUSTED_ENV = "TSTL_TRUSTED_CHECKPOINTS"

# Edits a converted checkpoint in place before it loads: (conversion, the model's own state dict) -> None.
StateDictAdapter = Callable[[Conversion, dict[str, torch.Tensor]], None]

Trust = bool | Iterable[str | os.PathLike]


class UntrustedCheckpointError(ValueError):
    """A checkpoint's pickle names globals outside the allow-list; ``globals`` lists them."""

    def __init__(self, message: str, path: str, names: Sequence[str]) -> None:
        super().__init__(message)
        self.path, self.globals = path, list(names)


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


def is_trusted(path: str | os.PathLike, trusted: Trust = False) -> str | None:
    """Why ``path`` is trusted (a phrase for the log), or None.

    Trusted: ``trusted is True``; ``path`` in the iterable ``trusted`` (the ``model.trusted_checkpoints`` config
    list); or ``path`` in the environment variable ``TSTL_TRUSTED_CHECKPOINTS`` (``os.pathsep``-separated). Paths
    compare after ``os.path.realpath``; only files are listed, never folders.
    """
    if trusted is True:
        return "trusted=True"
    real = os.path.realpath(path)
    listed = [] if isinstance(trusted, bool) else [trusted] if isinstance(trusted, (str, os.PathLike)) else trusted
    if any(os.path.realpath(p) == real for p in listed):
        return "listed in trusted_checkpoints"
    if any(p and os.path.realpath(p) == real for p in os.environ.get(TRUSTED_ENV, "").split(os.pathsep)):
        return f"listed in ${TRUSTED_ENV}"
    return None


def _foreign_globals(path: str, error: Exception) -> list[str]:
    """The globals outside the allow-list that ``path``'s pickle names (torch's error names only the first)."""
    try:
        names = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in _ALLOWED]
    except Exception:
        names = []
    if not names:
        names = re.findall(r"GLOBAL (\S+) was not an allowed global", str(error))
    return names


def _torch_load(path: str, trusted: Trust) -> object:
    """``torch.load`` weights-only with ``SAFE_GLOBALS``; a refused file raises or, if trusted, loads unsafely."""
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise
        names = _foreign_globals(path, e)
        why = is_trusted(path, trusted)
        if why is None:
            what = (f"names the global{'s' if len(names) > 1 else ''} {', '.join(names)}" if names
                    else f"is refused by the weights-only unpickler ({str(e).strip().splitlines()[-1][:300]})")
            raise UntrustedCheckpointError(
                f"{path}: refused: its pickle {what}, which is not in the allow-list of plain types "
                f"(torch tensors and containers, {', '.join(_ALLOWED)}). Unpickling it "
                f"can run arbitrary code. If you trust this file, pass trusted=True to read_checkpoint/"
                f"load_checkpoint, list it in the run's model.trusted_checkpoints, or add it to ${TRUSTED_ENV}; "
                f"better, re-save its weights with torch.save(state_dict).", path, names) from None
        logger.warning("%s: LOADING WITH weights_only=False (%s): its pickle names %s, outside the allow-list; "
                       "this runs whatever code the file carries", path, why, ", ".join(names) or "unsupported content")
        return torch.load(path, map_location="cpu", weights_only=False)


def read_checkpoint(path: str | os.PathLike, *, trusted: Trust = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file and return its flat tensor state dict, unwrapped from training-script containers.

    Args:
        path: the file.
        trusted: opt-in for a file whose pickle names globals outside ``SAFE_GLOBALS`` (see ``is_trusted``).

    Raises:
        FileNotFoundError: no such file.
        UntrustedCheckpointError: the pickle names a global outside the allow-list and the file is not trusted.
        ValueError: not a readable checkpoint, or no tensors where a state dict is expected.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if _is_torchscript(path):
        # OpenAI's CLIP releases are TorchScript archives; they cannot be read with weights_only=True.
        logger.info("%s: TorchScript archive, reading with torch.jit.load", path)
        return dict(torch.jit.load(path, map_location="cpu").state_dict().items())
    try:
        obj = _torch_load(path, trusted)
    except UntrustedCheckpointError:
        raise
    except Exception as e:
        raise ValueError(
            f"{path}: cannot be read as a torch checkpoint ({type(e).__name__}: {e})."
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


def load_checkpoint(model: VideoClassifier, path: str | os.PathLike, *, strict: bool = True,
                    reinit_mismatched: tuple[str, ...] = (), adapters: Sequence[StateDictAdapter] = (),
                    trusted: Trust = False) -> LoadReport:
    """Detect the format of ``path``, map it onto ``model`` and load it.

    Args:
        model: a ``VideoClassifier`` (its ``convert_checkpoint`` maps the layout).
        path: checkpoint file (any supported format).
        strict: raise if a key is missing or unexpected without an explanation from the converter.
        reinit_mismatched: key prefixes (e.g. ``("head.",)``) whose tensors are skipped, and keep the model's
            initialisation, when their shape differs: fine-tuning from a checkpoint of another number of classes
            (as CAST's fine-tuning does). Any other shape mismatch is an error.
        adapters: state-dict adapters, called in order after the conversion and before the shape checks as
            ``adapter(conversion, model.state_dict())``; each edits ``conversion.state_dict`` and its explanations
            in place (e.g. TSTL's selection of head rows, owned by ``tstl.twostage``).
        trusted: opt-in for a file whose pickle names globals outside the allow-list (see ``is_trusted``).

    Returns:
        A ``LoadReport`` with the missing and unexpected keys (also logged).
    """
    if not isinstance(model, VideoClassifier):
        raise TypeError(f"{type(model).__name__} is not a VideoClassifier (tstl.models.contract): "
                        "load_checkpoint needs its convert_checkpoint()")
    state_dict = read_checkpoint(path, trusted=trusted)
    conv = model.convert_checkpoint(state_dict)
    own = model.state_dict()
    for adapter in adapters:
        adapter(conv, own)
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
