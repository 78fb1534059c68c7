"""Compute counts of a video model's forward pass."""

from __future__ import annotations

import torch

from tstl.models.contract import VideoClassifier


def flops_per_view(model: VideoClassifier) -> float:
    """Multiply-accumulates of one forward view, counted with torch's FlopCounterMode (FLOPs / 2).

    The view is ``[1, 3, num_frames, img_size, img_size]`` on the default device: under ``with torch.device("meta")``
    a full-size model is counted without computing anything.
    """
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, model.num_frames, model.img_size, model.img_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2
