"""Model FLOPs of a training step, achieved FLOP/s and MFU (model FLOPs utilisation).

The rule (docs/training.md, "Throughput and MFU"): the FLOPs of one training clip are *counted*, not estimated, with
torch's ``FlopCounterMode`` on a meta-device copy of the model (nothing is computed), forward plus backward of a
batch of one, without activation checkpointing (recomputation is not useful work, as in PaLM's MFU). Autograd runs
only what training needs, so:

* frozen weights (``requires_grad=False``, B-CAST's CLIP/VideoMAE streams) cost no weight-gradient FLOPs;
* layers below the lowest trainable parameter cost no input-gradient FLOPs either;
* a fully trainable model comes out at about 3x its forward FLOPs, B-CAST with frozen backbones and adapters in
  every block at about 2x plus the adapters' and the head's weight gradients.

Only matmuls, convolutions and attention are counted (FlopCounterMode's set; norms, activations and the optimizer
are left out, as usual for MFU). MFU = achieved model FLOP/s per device / the device's dense bf16/fp16 peak; it is
reported only for ``engine.precision`` bf16 or fp16 on a GPU named in ``PEAK_TFLOPS``, otherwise only the achieved
FLOP/s are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("A6000", 154.8),  # RTX A6000, dense fp16/bf16 tensor (309.7 with sparsity)
    ("A100", 312.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
)
"""Dense bf16/fp16 tensor-core peak by a substring of ``torch.cuda.get_device_name`` (first match wins)."""


def peak_flops(device_name: str, precision: str) -> float | None:
    """The device's dense peak FLOP/s at ``precision``; None when unknown (then no MFU is reported)."""
    if precision not in ("bf16", "fp16"):
        return None
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()


def train_flops_per_clip(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[float, float]:
    """(forward FLOPs, forward + backward FLOPs) of one clip of ``input_shape`` (``[C, T, H, W]``) through
    ``model`` as it trains (its ``requires_grad`` flags decide the backward); one FLOP = one multiply or add."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    x = torch.zeros(1, *input_shape, device=device)
    was_training = model.training
    model.train()
    try:
        with FlopCounterMode(display=False) as counter:
            out = model(x)
            forward = counter.get_total_flops()
            outs = list(out.values()) if isinstance(out, dict) else [out]  # multi-head: per head
            if any(o.requires_grad for o in outs):
                torch.stack([o.float().sum() for o in outs]).sum().backward()
        total = counter.get_total_flops()
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return float(forward), float(total)


def count_on_meta(build: Callable[[], nn.Module], input_shape: tuple[int, ...]) -> tuple[float, float] | None:
    """:func:`train_flops_per_clip` of the model ``build()`` makes on the meta device; None (with a warning) when
    the model cannot be built or run there. The CPU random state is left as it was."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            return train_flops_per_clip(build(), input_shape)
    except Exception as e:  # a model that cannot run on meta must not stop training; only the MFU is lost
        logger.warning("could not count the model's FLOPs on the meta device (%s: %s); no MFU is reported",
                       type(e).__name__, e)
        return None
