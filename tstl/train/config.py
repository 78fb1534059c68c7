"""Typed configuration of a training run, loaded from ``configs/*.yaml`` with dotted
command-line overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tstl.data.config import DataConfig
from tstl.train.ds_config import EngineConfig, validate_deepspeed


@dataclass
class ModelConfig:
    """Which model to build and what to load into it."""

    name: str = "bcast_vit_b16"
    """A registered model (``tstl.models.list_models()``)."""
    num_classes: int = 0
    """Classes of the head; 0 = the number in the training shard set's ``shards.json``."""
    drop_path_rate: float = 0.0
    """Stochastic depth of the last block (linearly increasing from 0)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Further architecture arguments (e.g. ``attention_type`` for TimeSformer)."""
    init: list[str] = field(default_factory=list)
    """Checkpoints loaded in order before training (CLIP, VideoMAE, CAST, TimeSformer, timm; see
    docs/models.md). An entry may also be a run folder (its best checkpoint) or a DeepSpeed tag
    folder. A checkpoint whose head has another number of classes initialises everything but
    the head."""
    trusted_checkpoints: list[str] = field(default_factory=list)
    """Checkpoint files loaded with full pickle (not weights-only) because they hold objects outside
    the allow-list (``tstl.models.checkpoint``); only for files you trust.
    ``$TSTL_TRUSTED_CHECKPOINTS`` lists more."""
    freeze_pretrained: bool = True
    """Keep the model's pre-trained backbones frozen (B-CAST's CLIP/VideoMAE streams), as its family
    defines. False: every parameter trains (only for backbones without pre-trained weights, as in
    the CPU demo)."""
    grad_checkpointing: bool = False
    """Activation checkpointing (less memory, ~30% more compute)."""


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule. Learning rates are per 256 clips and scaled by the
    total batch."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    """Peak learning rate for a total batch of 256 (scaled linearly by total_batch / 256)."""
    min_lr: float = 1e-6
    """Final learning rate of the cosine, per 256 clips."""
    warmup_epochs: float = 5.0
    """Linear warm-up from 0 over this many epochs."""
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9
    """SGD only."""
    layer_decay: float = 0.75
    """Layer-wise learning-rate decay (1.0 = off); needs the model's ``group_matcher``."""
    clip_grad: float = 0.0
    """Gradient-norm clipping (0 = off)."""
    schedule: Literal["cosine", "steps"] = "cosine"
    """``cosine``: linear warm-up, then cosine to ``min_lr`` (CAST/VideoMAE). ``steps``: lr x
    ``lr_factors[i]`` from epoch ``lr_steps[i]`` on (PySlowFast ``steps_with_relative_lrs``;
    TimeSformer), after any warm-up."""
    lr_steps: list[float] = field(default_factory=list)
    """``steps``: epochs at which each factor starts, beginning with 0 (TimeSformer:
    ``[0, 11, 14]``)."""
    lr_factors: list[float] = field(default_factory=list)
    """``steps``: lr multipliers, one per entry of ``lr_steps`` (TimeSformer:
    ``[1, 0.1, 0.01]``)."""
    weight_decay_all: bool = False
    """Decay every trainable parameter (PySlowFast's ``construct_optimizer``: only names containing
    ``bn`` are exempt, a ViT has none). False exempts biases, norms and the model's
    ``no_weight_decay()`` (CAST/timm)."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.warmup_epochs < 0:
            raise ValueError("lr must be > 0, min_lr and warmup_epochs >= 0")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.schedule == "steps":
            if not self.lr_steps or len(self.lr_steps) != len(self.lr_factors):
                raise ValueError(
                    "schedule=steps needs lr_steps and lr_factors of the same, non-zero length")
            if (self.lr_steps[0] != 0
                    or any(b <= a for a, b in zip(self.lr_steps, self.lr_steps[1:]))):
                raise ValueError(f"lr_steps must start at 0 and increase, got {self.lr_steps}")


@dataclass
class CheckpointConfig:
    every_epochs: int = 1
    """Save at the end of every this many epochs (and at the end of training)."""
    every_steps: int = 0
    """Also save every this many optimizer steps (0 = off); resumes mid-epoch."""
    keep_last: int = 2
    """Complete checkpoints kept besides the best one."""
    every_minutes: float = 30.0
    """Also save when this many minutes of wall-clock time passed since the last save (0 = off; rank
    0's clock decides for all ranks), so a preempted or crashed job loses minutes, not an epoch."""
    accept_config_change: bool = False
    """Resume even though the run's config.yaml differs in keys outside the safe
    set (tstl/train/resume_guard.py)."""

    def __post_init__(self) -> None:
        if self.every_minutes < 0:
            raise ValueError("checkpoint.every_minutes must be >= 0 (0 = off)")


@dataclass
class TrainConfig:
    """A whole run: data, model, optimisation, engine, checkpoints, evaluation."""

    dataset: str = "ucf101"
    data_dir: str = "data"
    """Folder holding ``<dataset>/shards/<split>``: a local path or an http(s) URL (nothing local
    but the config); with ``data.shard_url_template`` and no local ``shards.json`` the shard lists
    come from the template."""
    train_split: str = "train_split1"
    val_split: str = "test_split1"
    """Shard set for the per-epoch single-view validation and the final multi-view test."""
    out_dir: str = "runs/default"
    """Run folder: resolved config, checkpoints, metrics, evaluation report. A rerun resumes
    from it."""
    epochs: int = 30
    seed: int = 0
    max_nonfinite: int = 10
    """Stop after this many non-finite losses (each one's step is skipped)."""
    val_every: int = 1
    """Quick single-view validation every this many epochs (0 = off)."""
    test_at_end: bool = True
    """Full multi-view test (data.test_views) after training."""
    log_every: int = 10
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    test_merge: Literal["mean_softmax", "sum_logits"] = "mean_softmax"
    """How the test views of a video are merged: ``mean_softmax`` (CAST/VideoMAE: mean of per-view
    softmax) or ``sum_logits`` (PySlowFast ``DATA.ENSEMBLE_METHOD: sum`` on
    TimeSformer's logits)."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")

    def check(self) -> None:
        """The rules over the whole merged config, run once by ``load_config`` after the last layer:
        ``engine.deepspeed`` through DeepSpeed's own parser (DeepSpeed is imported only for runs
        that set it)."""
        if self.engine.deepspeed:
            validate_deepspeed(self.engine, self.data.batch_size, self.optim.clip_grad)

    def shard_dir(self, split: str) -> Path | str:
        """The shard set of ``split``: ``<data_dir>/<dataset>/shards/<split>``; a URL string when
        ``data_dir`` is an http(s) URL (the loader then reads ``shards.json`` and the shards from
        there, docs/loader.md)."""
        if self.data_dir.startswith(("http://", "https://")):
            return f"{self.data_dir.rstrip('/')}/{self.dataset}/shards/{split}"
        return Path(self.data_dir) / self.dataset / "shards" / split
