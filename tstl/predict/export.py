"""``tstl export --format onnx``: the run's classifier as an ONNX file plus a JSON sidecar.

The graph takes one batch of normalised views ``float32 [N, 3, T, S, S]`` (``N`` dynamic, ``T``
and ``S`` the run's ``num_frames`` and ``input_size``) and returns the logits
``[N, num_classes]`` (a model with several heads returns one output per head, named after its dict
keys). The sidecar (``<out>.json``, ``SIDECAR_FORMAT``) holds what a runtime needs to reproduce
``tstl predict`` without this package: class names, mean/std, frames, input size, frame sampling,
views, the merge rule and the prepare stage's transcode of raw files (docs/training.md, "Using a
trained model", has an onnxruntime + numpy + decord script that does it).

Exporter: PyTorch's TorchScript-based ``torch.onnx.export(..., dynamo=False)``. In torch 2.13 the
default (dynamo) exporter needs ``onnxscript``, which brings nothing these models need; the
TorchScript one needs only the ``onnx`` package (``pip install 'tstl-video[export]'``). Every
registered family (B-CAST, TimeSformer with divided, joint and space-only attention) exports at
opset 17; ``onnxruntime`` then checks the file against PyTorch (``CHECK_TOLERANCE``) on views of a
fixed seed.
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import EnvironmentFault
from tstl.core.exitcodes import UsageError
from tstl.predict.runs import LoadedRun, is_tstl_run, load

logger = logging.getLogger(__name__)

SIDECAR_FORMAT = "tstl-onnx/v1"
CHECK_TOLERANCE = 1e-4
"""Largest absolute difference of onnxruntime's logits from PyTorch's (fp32, CPU) accepted."""
INPUT = "video"
EXTRA_FIX = "pip install 'tstl-video[export]' (onnx and onnxruntime)"


class ExportError(RuntimeError):
    """The exported file does not reproduce PyTorch (the check failed)."""


class _Flat(nn.Module):
    """A classifier whose output is a tensor, a tuple/list or a dict of tensors, as a tuple (ONNX
    outputs are a flat list); ``names`` are the dict keys, or ``logits``/``logits_<i>``."""

    def __init__(self, model: nn.Module, example: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        with torch.no_grad():
            out = model(example)
        if isinstance(out, torch.Tensor):
            self.keys, self.names = None, ["logits"]
        elif isinstance(out, dict):
            self.keys = list(out)
            self.names = [str(k) for k in self.keys]
        elif isinstance(out, (tuple, list)):
            self.keys = list(range(len(out)))
            self.names = [f"logits_{i}" for i in self.keys]
        else:
            raise UsageError(f"the model returns a {type(out).__name__}",
                             "export handles tensors, tuples and dicts of tensors")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(x)
        return (out,) if self.keys is None else tuple(out[k] for k in self.keys)


def _onnx_bytes(flat: _Flat, example: torch.Tensor, opset: int, what: str) -> bytes:
    try:
        import onnx  # noqa: F401  (the TorchScript exporter serialises through it)
    except ImportError:
        raise EnvironmentFault(f"the ONNX exporter needs the onnx package: {EXTRA_FIX}") from None
    buf = io.BytesIO()
    axes = {name: {0: "batch"} for name in [INPUT, *flat.names]}
    try:
        with warnings.catch_warnings():
            # the TorchScript exporter's deprecation notice (see the module docstring), and the
            # tracer's notes that shape checks become constants: the graph has one view shape
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(flat, (example,), buf, dynamo=False, opset_version=opset,
                              input_names=[INPUT], output_names=flat.names, dynamic_axes=axes,
                              do_constant_folding=True)
    except Exception as e:  # the exporter names the operator it has no ONNX form for
        raise UsageError(f"{what} cannot be exported to ONNX opset {opset}: "
                         f"{type(e).__name__}: {str(e)[:500]}",
                         "try another --opset, or use tstl predict") from None
    return buf.getvalue()


def check_onnx(data: bytes, flat: _Flat, x: torch.Tensor) -> dict | None:
    """Largest difference of onnxruntime's outputs from PyTorch's on ``x`` (None without
    onnxruntime)."""
    try:
        import onnxruntime as ort
    except ImportError:
        logger.warning("onnxruntime is not installed: the exported file is not checked (%s)",
                       EXTRA_FIX)
        return None
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT: x.numpy()})
    with torch.no_grad():
        want = [t.numpy() for t in flat(x)]
    diff = max(float(np.abs(a - b).max()) for a, b in zip(got, want))
    return {"onnxruntime": ort.__version__, "views": int(x.shape[0]), "max_abs_diff": diff,
            "tolerance": CHECK_TOLERANCE}


def sidecar(run: LoadedRun, model: nn.Module, names: list[str], opset: int, checkpoint: str,
            check: dict | None) -> dict:
    """What a runtime needs besides the graph to reproduce ``tstl predict``."""
    from pipeline.transcode import TranscodeParams, build_command

    d, p = run.data, run.prepare
    transcode = None
    if not p.as_is:
        params = TranscodeParams(height=p.height, short_side=p.short_side)
        argv = build_command(Path("INPUT"), Path("OUTPUT.mp4"), params)
        transcode = {"height": p.height, "short_side": p.short_side, "ffmpeg_args": argv[1:]}
    size = model.img_size
    return {
        "format": SIDECAR_FORMAT, "model": run.config.model.name, "checkpoint": checkpoint,
        "opset": opset,
        "input": {"name": INPUT, "shape": ["batch", 3, model.num_frames, size, size],
                  "dtype": "float32", "layout": "N, RGB, frames, height, width",
                  "value": "(uint8 / 255 - mean) / std per channel"},
        "outputs": names, "classes": run.classes, "mean": list(d.mean), "std": list(d.std),
        "num_frames": d.num_frames, "input_size": d.input_size,
        "short_side_scale": d.short_side_scale or d.input_size,
        "sampling": {"sampling": d.sampling, "convention": d.sampling_convention,
                     "rate": d.sampling_rate},
        "test_views": list(d.test_views), "test_merge": run.config.test_merge,
        "resize": "short side to short_side_scale, bilinear (antialiased when shrinking, as torch "
                  "F.interpolate(antialias=True)), rounded to uint8; then test_views[1] crops of "
                  "input_size along the long side (1: the centre)",
        "prepare": transcode, "check": check,
    }


def export(checkpoint: str | Path, out: str | Path, *, fmt: str = "onnx",
           configs: Sequence[str | Path] = (), overrides: Sequence[str] = (),
           classes: str | Path | None = None, opset: int = 17,
           check: bool = True) -> dict[str, Path]:
    """Write ``out`` (the ONNX file) and ``out.with_suffix('.json')`` (the sidecar); returns both.

    Raises:
        UsageError: a TSTL run, a model output ONNX cannot hold, or an operator the exporter
            cannot convert.
        ExportError: onnxruntime's outputs differ from PyTorch's by more than ``CHECK_TOLERANCE``.
    """
    if fmt != "onnx":
        raise UsageError(f"--format {fmt}: not supported", "use --format onnx")
    if is_tstl_run(Path(checkpoint)):
        raise UsageError(f"{checkpoint} is a TSTL run: its selector picks which experts run for "
                         "each view (data-dependent control flow that one fixed ONNX graph does "
                         "not express without running every expert)",
                         "use tstl predict for TSTL runs, or export a single B-CAST run")
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise UsageError(f"--out {out}: not an .onnx file name", "e.g. --out exported/model.onnx")
    run = load(checkpoint, configs=configs, overrides=overrides, device="cpu",
               classes_file=classes)
    model = run.scorer.model.float().eval()
    gen = torch.Generator().manual_seed(0)
    shape = (3, model.num_frames, model.img_size, model.img_size)
    example = torch.randn((2, *shape), generator=gen)
    flat = _Flat(model, example)
    name = run.config.model.name
    data = _onnx_bytes(flat, example, opset, name)
    result = None
    if check:  # another batch size than the traced one: the batch axis must really be dynamic
        result = check_onnx(data, flat, torch.randn((3, *shape), generator=gen))
        if result is not None and not result["max_abs_diff"] <= CHECK_TOLERANCE:
            raise ExportError(f"{name}: onnxruntime's outputs differ from PyTorch's by "
                              f"{result['max_abs_diff']:.3g} (> {CHECK_TOLERANCE:g}); the file "
                              "was not written")
        if result is not None:
            logger.info("onnxruntime %s matches PyTorch: max |difference| %.3g",
                        result["onnxruntime"], result["max_abs_diff"])
    meta = sidecar(run, model, flat.names, opset, str(checkpoint), result)
    out.parent.mkdir(parents=True, exist_ok=True)
    side = out.with_suffix(".json")
    for path, payload in ((out, data), (side, (json.dumps(meta, indent=1) + "\n").encode())):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    logger.info("wrote %s (%.1f MB) and %s", out, len(data) / 1e6, side)
    return {"onnx": out, "sidecar": side}
