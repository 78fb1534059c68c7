"""Optimizer, learning-rate schedule and the DeepSpeed engine, all derived from our config.

The DeepSpeed config is generated, never written by hand: micro batch, accumulation, precision (bf16, or fp16 with
dynamic loss scaling), ZeRO stage and clipping come from ``TrainConfig``. Only trainable parameters reach the
optimizer, so frozen pre-trained backbones keep no optimizer state (and, having ``requires_grad=False``, no gradients).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch.optim.lr_scheduler import LambdaLR

from tstl.train.config import EngineConfig, OptimConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPlan:
    """The effective batch and how it is made, logged at start."""

    micro_batch: int
    accum_steps: int
    world_size: int

    @property
    def total(self) -> int:
        return self.micro_batch * self.accum_steps * self.world_size

    def scaled(self, lr: float) -> float:
        """Learning rates in configs are per 256 clips (the CAST/VideoMAE convention)."""
        return lr * self.total / 256


def deepspeed_config(cfg: EngineConfig, optim: OptimConfig, plan: BatchPlan) -> dict:
    """The DeepSpeed JSON config for this run."""
    ds: dict = {
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accum_steps,
        "train_batch_size": plan.total,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": cfg.zero_stage},
    }
    if optim.clip_grad > 0:
        ds["gradient_clipping"] = optim.clip_grad
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": cfg.fp16_initial_scale_power,
                      "loss_scale_window": cfg.fp16_loss_scale_window, "hysteresis": 2, "min_loss_scale": 1}
    return ds


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters only; no decay for biases, norms and the model's ``no_weight_decay()`` set;
    layer-wise lr decay through the model's timm ``group_matcher`` when ``layer_decay < 1``."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if cfg.layer_decay < 1.0 and hasattr(model, "group_matcher"):
        groups = param_groups_layer_decay(model, cfg.weight_decay, list(skip), layer_decay=cfg.layer_decay)
    else:
        groups = param_groups_weight_decay(model, cfg.weight_decay, list(skip))
    groups = [g for g in groups if g["params"]]
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad), "a trainable parameter has no group"
    return groups


def build_optimizer(groups: list[dict], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps)


def lr_factor(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak lr at optimizer ``step``: linear warm-up from 0 (both ends included, as CAST), then
    cosine down to ``min_lr``."""
    if step < warmup_steps:
        return step / max(warmup_steps - 1, 1) if warmup_steps > 1 else 1.0
    k, span = step - warmup_steps, max(total_steps - warmup_steps, 1)
    value = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(k, span) / span))
    return value / lr


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, lr: float, min_lr: float,
                    steps_per_epoch: int, epochs: int) -> LambdaLR:
    """Per-optimizer-step schedule; every group keeps its layer-decay scale."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    total = steps_per_epoch * epochs
    return LambdaLR(optimizer, lambda s: lr_factor(s, lr=lr, min_lr=min_lr, warmup_steps=warmup, total_steps=total))


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler_fn, ds_config: dict):
    """``deepspeed.initialize`` with our optimizer and scheduler; data loading stays ours (no training_data)."""
    import deepspeed

    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler_fn,
                                                   config=ds_config)
    return engine, scheduler
