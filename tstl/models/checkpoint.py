"""Load any supported checkpoint file into a model, safely; or check that it would load, without
reading its weights.

Reading and unwrapping the container is generic and lives here; mapping a foreign key layout (OpenAI
CLIP, VideoMAE, CAST, TimeSformer ``.pyth``, timm ViT, Hugging Face) onto a model is the model
family's job: every model is a ``VideoClassifier`` and implements ``convert_checkpoint(state_dict)
-> Conversion``.

Containers read here: torch pickles (``torch.save``, zip or legacy), OpenAI's TorchScript archives
(``torch.jit.load``), ``.safetensors`` files and Hugging Face model folders (``save_pretrained``
output or a hub-cache ``models--org--name[/snapshots/<hash>]`` folder: ``config.json`` +
``model.safetensors`` or ``pytorch_model.bin``, sharded or not).

Torch pickles are read with ``torch.load(weights_only=True)`` plus an explicit allow-list
(``SAFE_GLOBALS``) of the plain types the official training scripts pickle next to the weights. What
the reference ``save_model``/engine code writes (checked in the reference repositories;
tests/models/test_official_checkpoints.py builds each layout):

* VideoMAE / CAST / TSTL torch-amp path (``utils.save_model``): ``{"model", "optimizer", "epoch",
  "scaler", "args"}`` (+ ``"model_ema"``); ``args`` is the run's ``argparse.Namespace``. The
  optimizer's param groups hold ``numpy.float64`` learning rates and weight decays: the engines set
  ``param_group["lr"] = lr_schedule_values[it] * param_group["lr_scale"]`` and
  ``param_group["weight_decay"] = wd_schedule_values[it]`` from ``utils.cosine_scheduler``'s numpy
  arrays (CAST ``engine_for_onemodel.py:49-54``, TSTL ``:72-77``, VideoMAE
  ``engine_for_finetuning.py:49-54`` and ``engine_for_pretraining.py:26-31``), so the pickle names
  numpy's scalar constructor and ``numpy.dtype`` (and BUILDs a ``numpy.dtypes.Float64DType``).
* Their DeepSpeed path (``model.save_checkpoint``): ``mp_rank_00_model_states.pt`` with the fp16
  ``module``, ``buffer_names``, ``optimizer`` (DeepSpeed's FP16 optimizer state, whose inner param
  groups hold the same numpy scalars), ``param_shapes``, ``sparse_tensor_module_names`` (a set),
  step counters, ``ds_config``, ``ds_version`` and the client state ``{"epoch": ...}``.
* TimeSformer / PySlowFast ``.pyth``: ``{"epoch", "model_state", "optimizer_state", "cfg"}``,
  ``cfg`` a YAML string.

So the globals added are ``argparse.Namespace``, numpy's scalar constructor under its numpy 2 and
numpy 1.x names (``numpy._core.multiarray.scalar``, ``numpy.core.multiarray.scalar``: TSTL's
environment pins torch 1.11, i.e. numpy 1.x), ``numpy.dtype`` and the numeric dtype classes (bool,
integers, floats, complex; not the object dtype). None of them can run code: a scalar is built from
a dtype and raw bytes. A file whose pickle names any other global is refused
(``UntrustedCheckpointError``, naming the file and the globals) unless the user trusts it:
``trusted=True``, the file listed in a ``model.trusted_checkpoints`` config list passed as
``trusted=[...]``, or listed in the environment variable ``TSTL_TRUSTED_CHECKPOINTS`` (paths
separated by ``os.pathsep``). A trusted file that still fails the safe load is read with
``weights_only=False`` and a WARNING naming the file and its globals; never silently.

``check_checkpoint`` does everything ``load_checkpoint`` does except loading, on the key/shape table
only (zip pickles memory-mapped, safetensors headers, every tensor moved to the ``meta`` device):
the preflight of ``tstl train --check`` runs it against a model built on the meta device.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tstl.models.contract import Conversion, VideoClassifier
from tstl.models.layouts import UnsupportedLayoutError

__all__ = ["SAFE_GLOBALS", "TRUSTED_ENV", "CheckpointMismatchError", "Conversion", "LoadReport",
           "StateDictAdapter", "UnsupportedLayoutError", "UntrustedCheckpointError",
           "check_checkpoint", "hf_folder", "is_trusted", "load_checkpoint", "read_checkpoint"]

logger = logging.getLogger(__name__)

# Keys under which training scripts nest the weights: CAST/VideoMAE/TSTL ("model", "module"),
# DeepSpeed mp_rank_00_model_states.pt ("module"), PySlowFast/TimeSformer .pyth ("model_state"),
# generic ("state_dict").
_WRAPPER_KEYS = ("model_state", "module", "model", "state_dict")


def _numpy_globals() -> list[object | tuple[object, str]]:
    """numpy's scalar constructor under both names a checkpoint may use, ``numpy.dtype`` and the
    numeric dtype classes (a dtype unpickles as ``numpy.dtype(...)`` + BUILD, and torch only BUILDs
    allow-listed
    types)."""
    try:  # numpy 2 (numpy 1.26 has the numpy._core alias too)
        from numpy._core.multiarray import scalar
    except ImportError:  # pragma: no cover - numpy < 1.26
        from numpy.core.multiarray import scalar
    dtype_classes = {type(np.dtype(c)) for c in "?bhilqBHILQefdgFDG"}
    return [(scalar, "numpy._core.multiarray.scalar"), (scalar, "numpy.core.multiarray.scalar"),
            np.dtype, *sorted(dtype_classes, key=lambda t: t.__name__)]


# Globals a weights-only load may construct beyond torch's own (tensors, dtypes, torch.Size,
# OrderedDict, set): the run's argparse.Namespace (save_model's "args") and the numpy scalars the
# optimizer state holds (module docstring).
SAFE_GLOBALS: tuple[object, ...] = (argparse.Namespace, *_numpy_globals())

_ALLOWED = tuple(g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"
                 for g in SAFE_GLOBALS)

TRUSTED_ENV = "TSTL_TRUSTED_CHECKPOINTS"

# Hugging Face weight files of a model folder, in the order they are looked for (transformers' own
# preference).
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")

# Edits a converted checkpoint in place before it loads: (conversion, the model's own state dict)
# -> None.
StateDictAdapter = Callable[[Conversion, dict[str, torch.Tensor]], None]

Trust = bool | Iterable[str | os.PathLike]


class UntrustedCheckpointError(ValueError):
    """A checkpoint's pickle names globals outside the allow-list; ``globals`` lists them."""

    def __init__(self, message: str, path: str, names: Sequence[str]) -> None:
        super().__init__(message)
        self.path, self.globals = path, list(names)


class CheckpointMismatchError(ValueError):
    """A checkpoint of a known layout that does not fit the model: ``shapes`` (key: checkpoint vs
    model), ``missing`` (model keys it lacks) and ``unexpected`` (its keys the model lacks), each
    without
    an explanation."""

    def __init__(self, message: str, shapes: Sequence[str] = (), missing: Sequence[str] = (),
                 unexpected: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.shapes, self.missing, self.unexpected = list(shapes), list(missing), list(unexpected)


@dataclass
class LoadReport:
    """What ``load_checkpoint`` did (or ``check_checkpoint`` found): the detected format and every
    key that did not load one to one."""

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

    Trusted: ``trusted is True``; ``path`` in the iterable ``trusted`` (the
    ``model.trusted_checkpoints`` config list); or ``path`` in the environment variable
    ``TSTL_TRUSTED_CHECKPOINTS`` (``os.pathsep``-separated). Paths compare after
    ``os.path.realpath``; only files are listed, never folders.
    """
    if trusted is True:
        return "trusted=True"
    real = os.path.realpath(path)
    listed = ([] if isinstance(trusted, bool)
              else [trusted] if isinstance(trusted, (str, os.PathLike)) else trusted)
    if any(os.path.realpath(p) == real for p in listed):
        return "listed in trusted_checkpoints"
    if any(p and os.path.realpath(p) == real
           for p in os.environ.get(TRUSTED_ENV, "").split(os.pathsep)):
        return f"listed in ${TRUSTED_ENV}"
    return None


def _foreign_globals(path: str, error: Exception) -> list[str]:
    """The globals outside the allow-list that ``path``'s pickle names (torch's error names only
    the first)."""
    try:
        names = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                 if g not in _ALLOWED]
    except Exception:
        names = []
    if not names:
        names = re.findall(r"GLOBAL (\S+) was not an allowed global", str(error))
    return names


def _torch_load(path: str, trusted: Trust, mmap: bool = False) -> object:
    """``torch.load`` weights-only with ``SAFE_GLOBALS``; a refused file raises or, if trusted,
    loads unsafely.
    ``mmap``: map a zip-format file instead of reading it (legacy files are read)."""
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise
        names = _foreign_globals(path, e)
        why = is_trusted(path, trusted)
        if why is None and not names and "Unsupported operand" in str(e):
            # not a pickle at all (an HTML error page, a truncated download), or one with opcodes
            # the reader lacks
            detail = " ".join(str(e).split("error:")[-1].split())[:120]
            raise ValueError(f"not a torch pickle ({detail})") from None
        if why is None:
            what = (f"names the global{'s' if len(names) > 1 else ''} {', '.join(names)}" if names
                    else "is refused by the weights-only unpickler "
                         f"({str(e).strip().splitlines()[-1][:300]})")
            raise UntrustedCheckpointError(
                f"{path}: refused: its pickle {what}, which is not in the allow-list of plain "
                "types (torch tensors and containers, argparse.Namespace, numpy scalars and "
                "dtypes). Unpickling it can run arbitrary code. If you trust this file, pass "
                "trusted=True to read_checkpoint/load_checkpoint, list it in the run's "
                f"model.trusted_checkpoints, or add it to ${TRUSTED_ENV}; better, re-save its "
                "weights with torch.save(state_dict).", path, names) from None
        logger.warning("%s: LOADING WITH weights_only=False (%s): its pickle names %s, outside the "
                       "allow-list; this runs whatever code the file carries", path, why,
                       ", ".join(names) or "unsupported content")
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)


# ------------------------------------------------------------------- Hugging Face and safetensors


def hf_folder(path: str | os.PathLike) -> Path | None:
    """The Hugging Face model folder ``path`` points to, or None when it is not one.

    Accepts a ``save_pretrained`` folder or a hub-cache snapshot (``.../snapshots/<hash>``), both
    holding ``config.json`` and a weights file (``HF_WEIGHTS``), and a hub-cache repository folder
    ``models--org--name``, which resolves to the snapshot ``refs/main`` names (or its only
    snapshot).

    Raises:
        FileNotFoundError: a hub-cache repository folder whose snapshot cannot be chosen or holds no
        weights.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "snapshots").is_dir() and path.name.startswith("models--"):
        ref = path / "refs" / "main"
        snaps = sorted(p for p in (path / "snapshots").iterdir() if p.is_dir())
        if ref.is_file() and (path / "snapshots" / ref.read_text().strip()).is_dir():
            path = path / "snapshots" / ref.read_text().strip()
        elif len(snaps) == 1:
            path = snaps[0]
        else:
            example = snaps[0] if snaps else path / "snapshots/<hash>"
            raise FileNotFoundError(f"{path}: a hub-cache folder with {len(snaps)} snapshots and "
                                    f"no refs/main: give the snapshot folder, e.g. {example}")
        if not any((path / w).is_file() for w in HF_WEIGHTS):
            raise FileNotFoundError(f"{path}: the hub snapshot holds no weights file "
                                    f"({', '.join(HF_WEIGHTS)}); "
                                    "download the model's weights (not only its config)")
    if (path / "config.json").is_file() and any((path / w).is_file() for w in HF_WEIGHTS):
        return path
    return None


def _is_safetensors(path: str) -> bool:
    """The safetensors header: an 8-byte little-endian length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    return (len(head) == 9 and head[8:9] == b"{"
            and int.from_bytes(head[:8], "little") < os.path.getsize(path))


def _read_safetensors(path: str, meta: bool) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file's tensors; ``meta``: only its header (names, shapes, dtypes) as meta
    tensors."""
    from safetensors import safe_open  # timm's dependency

    out = {}
    with safe_open(path, framework="pt") as f:
        for k in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            if meta:
                sl = f.get_slice(k)
                dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
                out[k] = torch.empty(sl.get_shape(), dtype=dtype or torch.float32, device="meta")
            else:
                out[k] = f.get_tensor(k)
    return out


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                       "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _read_hf_folder(folder: Path, trusted: Trust, meta: bool) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face model folder: safetensors first, else ``pytorch_model.bin``,
    either sharded
    (``*.index.json``'s ``weight_map``) or not."""
    name = next(w for w in HF_WEIGHTS if (folder / w).is_file())
    if name.endswith(".index.json"):
        files = sorted(set(json.loads((folder / name).read_text())["weight_map"].values()))
    else:
        files = [name]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        path = str(folder / f)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder}: shard {f} named by {name} is missing")
        if f.endswith(".safetensors"):
            out.update(_read_safetensors(path, meta))
        else:
            out.update(_unwrap(path, _torch_load(path, trusted, mmap=meta)))
    logger.info("%s: Hugging Face model folder (%s)", folder, ", ".join(files))
    return out


# ------------------------------------------------------------------------------ reading any file


def _unwrap(path: str, obj: object) -> dict[str, torch.Tensor]:
    while isinstance(obj, dict):
        inner = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = obj[inner]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: no state dict found (expected a mapping of names to tensors)")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(
            f"{path}: the checkpoint holds no tensors at its top level or under {_WRAPPER_KEYS}")
    return tensors


def read_checkpoint(path: str | os.PathLike, *, trusted: Trust = False, meta: bool = False
                    ) -> dict[str, torch.Tensor]:
    """Read a checkpoint file or Hugging Face model folder and return its flat tensor state dict,
    unwrapped from training-script containers.

    Args:
        path: the file, or a Hugging Face model folder (see ``hf_folder``). trusted: opt-in for a
        file whose pickle names globals outside ``SAFE_GLOBALS`` (see ``is_trusted``). meta: return
        the key/shape table only, as tensors on the ``meta`` device, reading as little as the format
        allows (zip pickles memory-mapped, safetensors headers; legacy pickles and TorchScript are
        read).

    Raises:
        FileNotFoundError: no such file. UntrustedCheckpointError: the pickle names a global outside
        the allow-list and the file is not trusted. ValueError: not a readable checkpoint, or no
        tensors where a state dict is expected.
    """
    path = os.fspath(path)
    folder = hf_folder(path)
    if folder is not None:
        sd = _read_hf_folder(folder, trusted, meta)
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}" + (
            " (a folder, but no Hugging Face model folder: it needs config.json and one of "
            f"{', '.join(HF_WEIGHTS)})" if os.path.isdir(path) else ""))
    elif _is_torchscript(path):
        # OpenAI's CLIP releases are TorchScript archives; they cannot be read with
        # weights_only=True.
        logger.info("%s: TorchScript archive, reading with torch.jit.load", path)
        sd = dict(torch.jit.load(path, map_location="meta" if meta else "cpu").state_dict().items())
    elif _is_safetensors(path):
        sd = _read_safetensors(path, meta)
    else:
        try:
            obj = _torch_load(path, trusted, mmap=meta)
        except UntrustedCheckpointError:
            raise
        except Exception as e:
            raise ValueError(f"{path}: cannot be read as a torch checkpoint "
                             f"({type(e).__name__}: {e}).") from e
        sd = _unwrap(path, obj)
    if meta:
        sd = {k: v if v.is_meta else torch.empty(v.shape, dtype=v.dtype, device="meta")
              for k, v in sd.items()}
    return sd


# ----------------------------------------------------------------------------- checking, loading


def _plan(model: VideoClassifier, state_dict: dict[str, torch.Tensor], path: str, *, strict: bool,
          reinit_mismatched: tuple[str, ...], adapters: Sequence[StateDictAdapter],
          loading: bool = True) -> tuple[Conversion, LoadReport]:
    """Convert ``state_dict`` for ``model`` and decide what loads; raise what a load would raise.
    ``loading``: the re-initialised head is worth a WARNING (a check logs it at INFO)."""
    try:
        conv = model.convert_checkpoint(state_dict)
    except UnsupportedLayoutError as e:
        raise UnsupportedLayoutError(f"{path}: {e}", e.layout) from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    own = model.state_dict()
    for adapter in adapters:
        adapter(conv, own)
    for k in [k for k, v in conv.state_dict.items() if k.startswith(reinit_mismatched) and k in own
              and v.shape != own[k].shape]:
        logger.log(logging.WARNING if loading else logging.INFO,
                   "%s: %s has shape %s, the model %s: kept at its initialisation", path, k,
                   tuple(conv.state_dict[k].shape), tuple(own[k].shape))
        del conv.state_dict[k]
        conv.explained_missing[k] = "shape differs (another number of classes): re-initialised"
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in conv.state_dict.items() if k in own and v.shape != own[k].shape]
    if shapes:
        raise CheckpointMismatchError(
            f"{path} ({conv.format}): shape mismatch:\n  " + "\n  ".join(shapes), shapes)
    explained = {**conv.explained_missing, **conv.explained_unexpected}
    extra = set(conv.state_dict) - set(own)
    report = LoadReport(path=path, format=conv.format, loaded=len(conv.state_dict) - len(extra),
                        missing=sorted(set(own) - set(conv.state_dict)),
                        unexpected=sorted(extra | set(conv.explained_unexpected)),
                        explained=explained)
    if strict and report.unexplained:
        missing = [k for k in report.unexplained if k in own]
        unexpected = [k for k in report.unexplained if k not in own]
        parts = ([f"{len(missing)} model keys it lacks, e.g. {missing[:8]}"] if missing else []) + (
            [f"{len(unexpected)} keys the model does not have, e.g. {unexpected[:8]}"]
            if unexpected else [])
        raise CheckpointMismatchError(
            f"{path} ({conv.format}): does not fit {type(model).__name__}: {'; '.join(parts)}. "
            "Pass strict=False to load anyway.", missing=missing, unexpected=unexpected)
    return conv, report


def check_checkpoint(model: VideoClassifier, path: str | os.PathLike, *, strict: bool = True,
                     reinit_mismatched: tuple[str, ...] = (),
                     adapters: Sequence[StateDictAdapter] = (),
                     trusted: Trust = False) -> LoadReport:
    """Everything ``load_checkpoint`` checks, without reading the weights or changing ``model``
    (which may live on
    the ``meta`` device): the format is readable and allowed, the layout is the model family's,
    every key is loaded or explained and every shape fits (after the documented resizes). Same
    arguments and errors as ``load_checkpoint``; returns the ``LoadReport`` a load would return.
    """
    if not isinstance(model, VideoClassifier):
        raise TypeError(f"{type(model).__name__} is not a VideoClassifier (tstl.models.contract)")
    state_dict = read_checkpoint(path, trusted=trusted, meta=True)
    return _plan(model, state_dict, os.fspath(path), strict=strict,
                 reinit_mismatched=reinit_mismatched, adapters=adapters, loading=False)[1]


def load_checkpoint(model: VideoClassifier, path: str | os.PathLike, *, strict: bool = True,
                    reinit_mismatched: tuple[str, ...] = (),
                    adapters: Sequence[StateDictAdapter] = (),
                    trusted: Trust = False) -> LoadReport:
    """Detect the format of ``path``, map it onto ``model`` and load it.

    Args:
        model: a ``VideoClassifier`` (its ``convert_checkpoint`` maps the layout).
        path: checkpoint file (any supported format) or Hugging Face model folder.
        strict: raise if a key is missing or unexpected without an explanation from the converter.
        reinit_mismatched: key prefixes (e.g. ``("head.",)``) whose tensors are skipped, and keep
            the model's initialisation, when their shape differs: fine-tuning from a checkpoint of
            another number of classes (as CAST's fine-tuning does). Any other shape mismatch is
            an error.
        adapters: state-dict adapters, called in order after the conversion and before the shape
            checks as ``adapter(conversion, model.state_dict())``; each edits
            ``conversion.state_dict`` and its explanations in place (e.g. TSTL's selection of head
            rows, owned by ``tstl.twostage``).
        trusted: opt-in for a file whose pickle names globals outside the allow-list
            (see ``is_trusted``).

    Returns:
        A ``LoadReport`` with the missing and unexpected keys (also logged).

    Raises:
        FileNotFoundError, UntrustedCheckpointError, ValueError: as ``read_checkpoint``.
        UnsupportedLayoutError: a layout the model's family cannot take (the message names the model
        that can). CheckpointMismatchError: a shape that differs, or (strict) keys neither loaded
        nor explained.
    """
    if not isinstance(model, VideoClassifier):
        raise TypeError(f"{type(model).__name__} is not a VideoClassifier (tstl.models.contract): "
                        "load_checkpoint needs its convert_checkpoint()")
    path = os.fspath(path)
    conv, report = _plan(model, read_checkpoint(path, trusted=trusted), path, strict=strict,
                         reinit_mismatched=reinit_mismatched, adapters=adapters)
    model.load_state_dict(conv.state_dict, strict=False)
    logger.info("%s: %s, %d tensors loaded, %d missing, %d unexpected", path, conv.format,
                report.loaded, len(report.missing), len(report.unexpected))
    for key in report.missing + report.unexpected:
        logger.debug("  %s: %s", key, _reason(key, report.explained) or "UNEXPLAINED")
    return report
