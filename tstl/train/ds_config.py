"""The DeepSpeed engine's configuration: ours (``EngineConfig``) and the DeepSpeed JSON from it.

The DeepSpeed config is generated, never written by hand: micro batch, accumulation, precision
(bf16, or fp16 with dynamic loss scaling), ZeRO stage and clipping come from ``TrainConfig``;
``engine.deepspeed`` adds DeepSpeed's own features (monitors, flops profiler, comms logger, ZeRO
tuning) and is merged last (:func:`deepspeed_config`). The keys we generate are refused in
``engine.deepspeed`` (``EngineConfig``, on every config layer); DeepSpeed's own parser checks the
rest once, when the whole config has loaded (:func:`validate_deepspeed`, run by
``TrainConfig.check``).

This module imports nothing else of ``tstl.train``: ``config`` (which nests ``EngineConfig`` and
runs the check) and ``engine``/``trainer`` (which build the engine) both import it.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from tstl.core.config import flatten, merge

OWNED_DEEPSPEED_KEYS: dict[str, str] = {
    "train_batch_size": "data.batch_size and engine.accum_steps",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "engine.accum_steps",
    "gradient_clipping": "optim.clip_grad",
    "zero_optimization.stage": "engine.zero_stage",
    "bf16.enabled": "engine.precision",
    "bfloat16": "engine.precision",
    "fp16.enabled": "engine.precision",
    "fp16.loss_scale": "engine.precision (fp16 scales the loss dynamically)",
    "fp16.initial_scale_power": "engine.fp16_initial_scale_power",
    "fp16.loss_scale_window": "engine.fp16_loss_scale_window",
    "amp": "engine.precision",
    "torch_autocast": "engine.precision",
    "optimizer": "optim.name and optim.*",
    "scheduler": "optim.schedule and optim.*",
}
"""DeepSpeed keys our config generates, and the key of ours that sets each: ``engine.deepspeed`` may
not set them."""


def owned_deepspeed_keys(extra: Mapping[str, Any]) -> list[str]:
    """Messages for the keys of ``engine.deepspeed`` that our config owns (empty: none); a key owns
    every key below it (``optimizer`` covers ``optimizer.params.lr``)."""
    owned: list[str] = []
    for leaf in flatten(dict(extra)):
        parts = leaf.split(".")
        for key in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
            if key in OWNED_DEEPSPEED_KEYS and key not in owned:
                owned.append(key)
    return [f"engine.deepspeed.{key} is generated from our config: set {OWNED_DEEPSPEED_KEYS[key]} "
            "instead" for key in owned]


@dataclass
class EngineConfig:
    """What DeepSpeed does: precision, ZeRO stage, accumulation."""

    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    zero_stage: int = 0
    accum_steps: int = 1
    """Micro-batches per optimizer step (gradient accumulation)."""
    fp16_initial_scale_power: int = 16
    fp16_loss_scale_window: int = 1000
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed config merged into the generated one last, key by key (monitors,
    ``flops_profiler``, ``comms_logger``, ZeRO tuning; docs/training.md). Keys set by our config
    (batch sizes, accumulation, precision, ZeRO stage, clipping, optimizer, scheduler) are refused
    with our key named; DeepSpeed validates the rest when the config loads."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.accum_steps < 1:
            raise ValueError("accum_steps must be >= 1")
        owned = owned_deepspeed_keys(self.deepspeed)
        if owned:
            raise ValueError("; ".join(owned))


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


def deepspeed_config(cfg: EngineConfig, clip_grad: float, plan: BatchPlan) -> dict:
    """The DeepSpeed JSON config for this run (``clip_grad``: ``optim.clip_grad``, 0 = off)."""
    ds: dict = {
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accum_steps,
        "train_batch_size": plan.total,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": cfg.zero_stage},
    }
    if clip_grad > 0:
        ds["gradient_clipping"] = clip_grad
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0,
                      "initial_scale_power": cfg.fp16_initial_scale_power,
                      "loss_scale_window": cfg.fp16_loss_scale_window, "hysteresis": 2,
                      "min_loss_scale": 1}
    # engine.deepspeed last, key by key (owned keys were refused by EngineConfig)
    return merge(ds, cfg.deepspeed)


CHECKED_SECTIONS = ("flops_profiler",)
"""Sections DeepSpeed reads key by key (no schema): an unknown key inside them is refused too."""
SECTIONS = ("flops_profiler", "comms_logger", "tensorboard", "csv_monitor", "wandb", "comet",
            "zero_optimization", "activation_checkpointing", "wall_clock_breakdown",
            "memory_breakdown", "steps_per_print", "dump_state", "communication_data_type",
            "prescale_gradients", "gradient_predivide_factor", "sparse_gradients", "checkpoint",
            "aio", "data_efficiency", "compression_training", "autotuning", "elasticity",
            "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer")
"""Common top-level DeepSpeed keys, for the did-you-mean hint of a misspelt one."""


class _ReadLog(dict):
    """A dict recording which keys were read (DeepSpeedConfig reads its sections with get/in/[])."""

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
    """Check ``engine.deepspeed`` once the config has loaded: DeepSpeed's own ``DeepSpeedConfig``
    parses the merged config (its schemas reject unknown or mistyped keys in most sections), and
    keys DeepSpeed never reads (a misspelt section such as ``flops_profilr``) are refused. Raises
    ``ValueError`` naming ``engine.deepspeed``. (``EngineConfig`` refused the keys we own
    already.)"""
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = deepspeed_config(cfg, clip_grad, BatchPlan(micro_batch, cfg.accum_steps, 1))
    del ds["train_batch_size"]  # DeepSpeed derives it from the world size of whoever checks
    logged = _ReadLog(ds)
    try:
        DeepSpeedConfig(logged)
    except Exception as e:  # pydantic ValidationError, DeepSpeedConfigError, AssertionError...
        raise ValueError(f"engine.deepspeed: DeepSpeed rejects the merged config: {e}") from None
    unread = [k for k in cfg.deepspeed if k not in logged.read]
    unread += [f"{s}.{k}" for s in CHECKED_SECTIONS
               if s in cfg.deepspeed and isinstance(logged[s], _ReadLog)
               for k in cfg.deepspeed[s] if k not in logged[s].read]
    if unread:
        hints = []
        for key in unread:
            *parent, leaf = key.split(".")
            known = logged[parent[0]].read if parent else logged.read | set(SECTIONS)
            close = difflib.get_close_matches(leaf, [str(k) for k in known], n=1)
            mean = f" (did you mean {'.'.join([*parent, close[0]])!r}?)" if close else ""
            hints.append(f"engine.deepspeed.{key}{mean}")
        raise ValueError(f"DeepSpeed does not know {', '.join(hints)}; "
                         "see https://www.deepspeed.ai/docs/config-json/")
