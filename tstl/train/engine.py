"""Optimizer, layer-wise learning-rate decay, learning-rate schedule and the DeepSpeed engine.

The DeepSpeed config the engine starts with is generated from ours (``tstl.train.ds_config``). Only
trainable parameters reach the optimizer, so frozen pre-trained backbones keep no optimizer state
(and, having ``requires_grad=False``, no gradients).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
from timm.models import group_parameters
from torch.optim.lr_scheduler import LambdaLR

from tstl.models import VideoClassifier
from tstl.train.config import OptimConfig

logger = logging.getLogger(__name__)


def layer_ids(model: VideoClassifier) -> tuple[dict[str, int], int]:
    """Layer id of every parameter and the number of ids: timm's ``group_parameters`` on the model's
    ``group_matcher`` (the ids ``timm.optim.param_groups_layer_decay`` uses).

    The matchers give CAST's rule (KHU-VLL/CAST ``util_tools/optim_factory.py:24-44``,
    ``get_num_layer_for_vit``, as BEiT/VideoMAE): stem parameters 0, block ``i`` ``i + 1``, every
    other parameter (final norms, B-CAST's last adapters, the head) the top id ``num_blocks + 1``;
    with ``run_bidirection.py:374-376`` the scale of id ``k`` is
    ``layer_decay ** (num_blocks + 1 - k)``. They declare no ``(99999,)`` "merge into the last
    block" entries (timm ViT's convention for its final norm), which would put those parameters at
    the last block's scale.
    """
    ids = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    return ids, max(ids.values()) + 1


def param_groups(model: VideoClassifier, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters only, grouped by (weight decay, lr scale).

    Weight decay: CAST's rule (``util_tools/optim_factory.py:65-73``): none for 1-D parameters,
    biases and names containing an entry of the model's ``no_weight_decay()``;
    ``cfg.weight_decay_all`` decays every parameter (PySlowFast
    ``timesformer/models/optimizer.py:29-41``). Layer-wise lr decay (``layer_decay < 1``): the layer
    ids of :func:`layer_ids`; each parameter gets the lr scale and weight decay timm's
    ``param_groups_layer_decay`` gives it (tested). That function is not called itself: its groups
    come in first-seen order (one pair per layer even at ``layer_decay`` 1) and it cannot decay
    every parameter, while saved optimizer states are laid out by the sorted ``(layer, no_decay)``
    groups made here.
    """
    skip = set(model.no_weight_decay())
    ids, num_ids = layer_ids(model) if cfg.layer_decay < 1.0 else ({}, 1)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = not cfg.weight_decay_all and (
            p.ndim <= 1 or name.endswith(".bias") or name in skip or any(s in name for s in skip))
        layer = ids.get(name, num_ids - 1)
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                           "lr_scale": cfg.layer_decay ** (num_ids - 1 - layer)}
        groups[key]["params"].append(p)
    out = [groups[k] for k in sorted(groups)]
    n = sum(p.numel() for g in out for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad), (
        "a trainable parameter has no group")
    return out


def build_optimizer(groups: list[dict], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps)


def lr_factor(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak lr at optimizer ``step``: linear warm-up from 0 (both ends included,
    as CAST), then cosine down to ``min_lr``."""
    if step < warmup_steps:
        return step / max(warmup_steps - 1, 1) if warmup_steps > 1 else 1.0
    k, span = step - warmup_steps, max(total_steps - warmup_steps, 1)
    value = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(k, span) / span))
    return value / lr


def step_factor(epoch: float, lr_steps: list[float], lr_factors: list[float]) -> float:
    """PySlowFast ``steps_with_relative_lrs``: the factor of the last step that ``epoch``
    has reached.

    facebookresearch/TimeSformer ``timesformer/utils/lr_policy.py:49-74``: ``LRS[ind]`` where
    ``ind`` is the last ``i`` with ``STEPS[i] <= epoch`` (past ``MAX_EPOCH`` the last factor stays).
    """
    ind = 0
    for i, start in enumerate(lr_steps):
        if epoch >= start:
            ind = i
    return lr_factors[ind]


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, lr: float, min_lr: float,
                    steps_per_epoch: int, epochs: int) -> LambdaLR:
    """Per-optimizer-step schedule; every group keeps its layer-decay scale.

    ``cosine``: :func:`lr_factor`. ``steps``: the same linear warm-up (if any), then
    :func:`step_factor` at the fractional epoch ``step / steps_per_epoch`` (PySlowFast sets the lr
    every iteration from ``cur_epoch + cur_iter / data_size``, ``tools/train_net.py:71``).
    """
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    total = steps_per_epoch * epochs
    if cfg.schedule == "steps":
        def factor(s: int) -> float:
            if s < warmup:
                return ((s / max(warmup - 1, 1) if warmup > 1 else 1.0)
                        * step_factor(0.0, cfg.lr_steps, cfg.lr_factors))
            return step_factor(s / steps_per_epoch, cfg.lr_steps, cfg.lr_factors)
        return LambdaLR(optimizer, factor)
    return LambdaLR(optimizer, lambda s: lr_factor(s, lr=lr, min_lr=min_lr, warmup_steps=warmup,
                                                   total_steps=total))


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler_fn, ds_config: dict):
    """``deepspeed.initialize`` with our optimizer and scheduler; data loading stays ours
    (no training_data)."""
    import deepspeed

    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   lr_scheduler=scheduler_fn, config=ds_config)
    return engine, scheduler
