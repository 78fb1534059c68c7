"""Optimizer, learning-rate schedule and the DeepSpeed engine, all derived from our config.

The DeepSpeed config is generated, never written by hand: micro batch, accumulation, precision (bf16, or fp16 with
dynamic loss scaling), ZeRO stage and clipping come from ``TrainConfig``; ``engine.deepspeed`` adds DeepSpeed's own
features (monitors, flops profiler, comms logger, ZeRO tuning) and is merged last (:func:`deepspeed_config`). Only
trainable parameters reach the optimizer, so frozen pre-trained backbones keep no optimizer state (and, having
``requires_grad=False``, no gradients).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR

from tstl.core.config import merge
from tstl.models import VideoClassifier
from tstl.train.config import EngineConfig, OptimConfig, owned_deepspeed_keys

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
    # engine.deepspeed last, key by key (owned keys were refused when the config loaded: owned_deepspeed_keys)
    return merge(ds, cfg.deepspeed)


CHECKED_SECTIONS = ("flops_profiler",)
"""Sections DeepSpeed reads key by key (no schema): an unknown key inside them is refused too."""
SECTIONS = ("flops_profiler", "comms_logger", "tensorboard", "csv_monitor", "wandb", "comet", "zero_optimization",
            "activation_checkpointing", "wall_clock_breakdown", "memory_breakdown", "steps_per_print", "dump_state",
            "communication_data_type", "prescale_gradients", "gradient_predivide_factor", "sparse_gradients",
            "checkpoint", "aio", "data_efficiency", "compression_training", "autotuning", "elasticity",
            "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer")
"""Common top-level DeepSpeed keys, for the did-you-mean hint of a misspelt one."""


class _ReadLog(dict):
    """A dict that records which keys were read (DeepSpeedConfig reads its sections with get/in/[])."""

    def __init__(self, d: Mapping) -> None:
        super().__init__({k: _ReadLog(v) if isinstance(v, Mapping) else v for k, v in d.items()})
        self.read: set = set()

    def get(self, key, *default):
        self.read.add(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        self.read.add(key)
        return super().__contains__(key)


def validate_deepspeed(cfg: EngineConfig, micro_batch: int, clip_grad: float = 0.0) -> None:
    """Check ``engine.deepspeed`` when the config loads: owned keys are refused, then DeepSpeed's own
    ``DeepSpeedConfig`` parses the merged config (its schemas reject unknown or mistyped keys in most sections), and
    keys DeepSpeed never reads (a misspelt section such as ``flops_profilr``) are refused. Raises ``ValueError``
    naming ``engine.deepspeed``."""
    problems = owned_deepspeed_keys(cfg.deepspeed)
    if problems:
        raise ValueError("; ".join(problems))
    import difflib

    from deepspeed.runtime.config import DeepSpeedConfig

    ds = deepspeed_config(cfg, OptimConfig(clip_grad=clip_grad), BatchPlan(micro_batch, cfg.accum_steps, 1))
    del ds["train_batch_size"]  # DeepSpeed derives it from the world size, whatever process checks the config
    logged = _ReadLog(ds)
    try:
        DeepSpeedConfig(logged)
    except Exception as e:  # pydantic ValidationError, DeepSpeedConfigError, AssertionError...
        raise ValueError(f"engine.deepspeed: DeepSpeed rejects the merged config: {e}") from None
    unread = [k for k in cfg.deepspeed if k not in logged.read]
    unread += [f"{s}.{k}" for s in CHECKED_SECTIONS if s in cfg.deepspeed and isinstance(logged[s], _ReadLog)
               for k in cfg.deepspeed[s] if k not in logged[s].read]
    if unread:
        hints = []
        for key in unread:
            *parent, leaf = key.split(".")
            known = logged[parent[0]].read if parent else logged.read | set(SECTIONS)
            close = difflib.get_close_matches(leaf, [str(k) for k in known], n=1)
            hints.append(f"engine.deepspeed.{key}" + (f" (did you mean {'.'.join([*parent, close[0]])!r}?)"
                                                      if close else ""))
        raise ValueError(f"DeepSpeed does not know {', '.join(hints)}; see https://www.deepspeed.ai/docs/config-json/")


def _patterns(spec) -> list[tuple[re.Pattern, tuple | None]]:
    """A timm ``group_matcher`` entry (a regex, or a list of ``(regex, suffix)``) as compiled pairs."""
    if spec is None:
        return []
    if isinstance(spec, str):
        return [(re.compile(spec), None)]
    return [(re.compile(r), suffix) for r, suffix in spec]


def layer_ids(model: VideoClassifier) -> tuple[dict[str, int], int]:
    """Layer id of every parameter by CAST's rule, and the number of ids.

    KHU-VLL/CAST ``util_tools/optim_factory.py:24-44`` (``get_num_layer_for_vit``, as BEiT/VideoMAE): stem
    parameters 0, block ``i`` ``i + 1``, every other parameter the top id ``num_blocks + 1``; with
    ``run_bidirection.py:374-376`` the scale of id ``k`` is ``layer_decay ** (num_blocks + 1 - k)``. The stem and
    the indexed block pattern come from the model's timm ``group_matcher``; timm's ``(99999,)`` suffix ("merge into
    the last block", which put B-CAST's ``clip_ln_post``/``vmae_fc_norm``/last adapters at block 11's 0.75) is
    deliberately not honoured: those parameters get the top id, as in CAST.
    """
    matcher = model.group_matcher(coarse=False)
    stem = _patterns(matcher.get("stem"))
    blocks = [rx for rx, suffix in _patterns(matcher.get("blocks")) if suffix is None and rx.groups >= 1]
    block_of: dict[str, int] = {}
    stems: set[str] = set()
    for name, _ in model.named_parameters():
        if any(rx.match(name) for rx, _ in stem):
            stems.add(name)
            continue
        for rx in blocks:
            m = rx.match(name)
            if m:
                block_of[name] = int(m.group(1))
                break
    num_blocks = max(block_of.values(), default=-1) + 1
    ids = {name: 0 if name in stems else block_of[name] + 1 if name in block_of else num_blocks + 1
           for name, _ in model.named_parameters()}
    return ids, num_blocks + 2


def param_groups(model: VideoClassifier, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters only, grouped by (weight decay, lr scale).

    Weight decay: CAST's rule (``util_tools/optim_factory.py:65-73``): none for 1-D parameters, biases and names
    containing an entry of the model's ``no_weight_decay()``; ``cfg.weight_decay_all`` decays every parameter
    (PySlowFast ``timesformer/models/optimizer.py:29-41``). Layer-wise lr decay (``layer_decay < 1``): see
    :func:`layer_ids`.
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
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad), "a trainable parameter has no group"
    return out


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


def step_factor(epoch: float, lr_steps: list[float], lr_factors: list[float]) -> float:
    """PySlowFast ``steps_with_relative_lrs``: the factor of the last step that ``epoch`` has reached.

    facebookresearch/TimeSformer ``timesformer/utils/lr_policy.py:49-74``: ``LRS[ind]`` where ``ind`` is the last
    ``i`` with ``STEPS[i] <= epoch`` (past ``MAX_EPOCH`` the last factor stays).
    """
    ind = 0
    for i, start in enumerate(lr_steps):
        if epoch >= start:
            ind = i
    return lr_factors[ind]


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, lr: float, min_lr: float,
                    steps_per_epoch: int, epochs: int) -> LambdaLR:
    """Per-optimizer-step schedule; every group keeps its layer-decay scale.

    ``cosine``: :func:`lr_factor`. ``steps``: the same linear warm-up (if any), then :func:`step_factor` at the
    fractional epoch ``step / steps_per_epoch`` (PySlowFast sets the lr every iteration from
    ``cur_epoch + cur_iter / data_size``, ``tools/train_net.py:71``).
    """
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    total = steps_per_epoch * epochs
    if cfg.schedule == "steps":
        def factor(s: int) -> float:
            if s < warmup:
                return (s / max(warmup - 1, 1) if warmup > 1 else 1.0) * step_factor(0.0, cfg.lr_steps, cfg.lr_factors)
            return step_factor(s / steps_per_epoch, cfg.lr_steps, cfg.lr_factors)
        return LambdaLR(optimizer, factor)
    return LambdaLR(optimizer, lambda s: lr_factor(s, lr=lr, min_lr=min_lr, warmup_steps=warmup, total_steps=total))


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler_fn, ds_config: dict):
    """``deepspeed.initialize`` with our optimizer and scheduler; data loading stays ours (no training_data)."""
    import deepspeed

    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler_fn,
                                                   config=ds_config)
    return engine, scheduler
