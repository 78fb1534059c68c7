"""Model FLOPs, counted (not estimated) with torch's ``FlopCounterMode``: the project's one counter.

One FLOP is one multiply or one add (a multiply-accumulate is 2; papers' "GFLOPs" of video models
are often MACs: :func:`flops_per_view`). Only matmuls, convolutions and attention count
(FlopCounterMode's set; norms, activations and the optimizer are left out, as usual for MFU). On the
meta device nothing is computed, so a full-size model is counted in seconds on a CPU.

For training (``train=True``) the forward runs in training mode and the backward of the summed
output follows. Autograd runs only what training needs, so:

* frozen weights (``requires_grad=False``, B-CAST's CLIP/VideoMAE streams) cost no weight-gradient
  FLOPs;
* layers below the lowest trainable parameter cost no input-gradient FLOPs either;
* a fully trainable model comes out at about 3x its forward FLOPs, B-CAST with frozen backbones and
  adapters in every block at about 2x plus the adapters' and the head's weight gradients.

``tstl.train.perf`` turns the training count into achieved FLOP/s and MFU.
"""

from __future__ import annotations

import torch
from torch import nn

from tstl.models.contract import VideoClassifier


def count_flops(model: nn.Module, input_shape: tuple[int, ...], *,
                train: bool = False) -> tuple[float, float]:
    """(forward FLOPs, forward + backward FLOPs) of one input ``[1, *input_shape]`` on the model's
    device.

    ``train=False``: the model as it is, without autograd (the two numbers are equal).
    ``train=True``: in training mode (restored afterwards), its ``requires_grad`` flags deciding the
    backward; the gradients are cleared again.
    """
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, *input_shape, device=next(model.parameters()).device)
    if not train:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        return float(counter.get_total_flops()), float(counter.get_total_flops())
    was_training = model.training
    model.train()
    try:
        with FlopCounterMode(display=False) as counter:
            out = model(x)
            forward = counter.get_total_flops()
            if out.requires_grad:
                out.float().sum().backward()
        total = counter.get_total_flops()
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return float(forward), float(total)


def flops_per_view(model: VideoClassifier) -> float:
    """Multiply-accumulates of one forward view ``[1, 3, num_frames, img_size, img_size]``
    (FLOPs / 2). Under ``with torch.device("meta")`` a full-size model is counted without computing
    anything."""
    return count_flops(model, (3, model.num_frames, model.img_size, model.img_size))[0] / 2
