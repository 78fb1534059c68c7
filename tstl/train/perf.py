"""Achieved model FLOP/s and MFU (model FLOPs utilisation) of a training run.

The rule (docs/training.md, "Throughput and MFU"): the FLOPs of one training clip are counted by
``tstl.models.flops.count_flops`` (``train=True``) on a meta-device copy of the model (nothing is
computed), forward plus backward of a batch of one, without activation checkpointing (recomputation
is not useful work, as in PaLM's MFU); frozen weights cost no weight-gradient FLOPs (see that
module). MFU = achieved model FLOP/s per device / the device's dense bf16/fp16 peak; it is reported
only for ``engine.precision`` bf16 or fp16 on a GPU named in ``PEAK_TFLOPS``, otherwise only the
achieved FLOP/s are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from tstl.models.flops import count_flops

logger = logging.getLogger(__name__)

PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("A6000", 154.8),  # RTX A6000, dense fp16/bf16 tensor (309.7 with sparsity)
    ("A100", 312.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
)
"""Dense bf16/fp16 tensor-core peak by a substring of ``torch.cuda.get_device_name`` (first
match wins)."""


def peak_flops(device_name: str, precision: str) -> float | None:
    """The device's dense peak FLOP/s at ``precision``; None when unknown (then no MFU
    is reported)."""
    if precision not in ("bf16", "fp16"):
        return None
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()


def count_on_meta(build: Callable[[], nn.Module],
                  input_shape: tuple[int, ...]) -> tuple[float, float] | None:
    """(forward, forward + backward) training FLOPs of one clip of ``input_shape``
    (``[C, T, H, W]``) through the model ``build()`` makes on the meta device
    (``count_flops(..., train=True)``); None (with a warning) when the model cannot be built or run
    there. The CPU random state is left as it was."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            return count_flops(build(), input_shape, train=True)
    except Exception as e:
        # a model that cannot run on meta must not stop training; only the MFU is lost
        logger.warning("could not count the model's FLOPs on the meta device (%s: %s); no MFU is "
                       "reported", type(e).__name__, e)
        return None
