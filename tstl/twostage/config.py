"""Typed configuration of a TSTL run: a training run's config (shared by both stages) plus a
``tstl`` section.

A TSTL recipe layers the same files as ``make train`` (``configs/data/*.yaml``,
``configs/model/*.yaml``) and ``configs/tstl/*.yaml``, so both stages use the dataset's sampling,
augmentation and optimiser settings unless the ``tstl.selector`` / ``tstl.expert`` sections override
them (nested mappings with the keys of a training run, e.g. ``tstl.expert.epochs=5``). Those
sections are checked against ``TrainConfig`` when the config loads, so a typo fails before
anything trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tstl.core.config import ConfigError, from_dict, merge, to_dict
from tstl.train.config import TrainConfig


@dataclass
class TwoStageConfig:
    """What TSTL adds on top of a training run."""

    groups: str = ""
    """Class-group file (TSTL's ``class_grouping.json`` or ours, see docs/tstl.md); empty = balanced
    contiguous groups of ``num_groups``. Pinned in ``<out_dir>/groups.json`` at the first run."""
    num_groups: int = 0
    """Number of balanced groups when no ``groups`` file is given."""
    init: list[str] = field(default_factory=list)
    """Checkpoints loaded after ``model.init`` by both stages, e.g. a trained CAST (TSTL starts from
    one) or a run folder. A head of another number of classes is re-initialised (an expert takes its
    group's rows of a head over this dataset's classes). ``model.init`` or ``tstl.init`` is required
    for training."""
    selector: dict[str, Any] = field(default_factory=dict)
    """Overrides of the run config for the stage-1 selector (e.g. ``{epochs: 10}``)."""
    expert: dict[str, Any] = field(default_factory=dict)
    """Overrides of the run config for every stage-2 expert."""
    expert_split: str = ""
    """Training shard set of expert ``g``: ``expert_split.format(group=g)`` under
    ``<data_dir>/<dataset>/shards/``, e.g. ``train-g{group:02d}`` made with
    ``shard_tools subset --groups ... --group g`` (without ``--remap``). Empty: every expert reads
    ``train_split`` and keeps its classes on the fly (no extra disk)."""
    soft_top_k: int = 2
    """Soft routing: the selector's top-k groups' experts are weighted by its
    renormalised probabilities."""
    baseline: str = ""
    """A single B-CAST (run folder or checkpoint) evaluated on the same views in the ``eval``
    report; empty = none."""

    def __post_init__(self) -> None:
        if self.num_groups < 0 or self.soft_top_k < 1:
            raise ValueError("num_groups must be >= 0 and soft_top_k >= 1")
        if self.expert_split and "{group" not in self.expert_split:
            raise ValueError("expert_split must contain {group} (one shard set per group), "
                             f"got {self.expert_split!r}")


@dataclass
class TSTLConfig(TrainConfig):
    """A two-stage run: the training-run keys are the base of both stages; ``out_dir`` holds the
    whole run."""

    tstl: TwoStageConfig = field(default_factory=TwoStageConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        for stage in ("selector", "expert"):
            # unknown keys or bad values in tstl.<stage> fail when the config loads (with the file
            # named)
            try:
                self.stage_base(stage)
            except ConfigError as e:
                raise ValueError(str(e)) from None

    def check(self) -> None:
        """The rules over the whole layered config (not each file alone), run once by
        ``load_config``: the run's (``TrainConfig.check``), a group source, and every stage's config
        (frozen backbones, and DeepSpeed's check where a stage changes its input). Raises
        ``ConfigError``."""
        super().check()
        if not self.tstl.groups and not self.tstl.num_groups:
            raise ConfigError(
                "give tstl.groups=<group file> or tstl.num_groups=K (balanced groups)")
        for stage in ("selector", "expert"):
            config = self.stage_base(stage)
            if not config.model.freeze_pretrained:
                raise ConfigError(f"tstl.{stage}: model.freeze_pretrained must be true: TSTL "
                                  "stages keep the pre-trained backbones (CLIP/VideoMAE) frozen so "
                                  "that every stage shares them (start from a trained model with "
                                  "tstl.init=[...])")
            if (config.engine, config.data.batch_size, config.optim.clip_grad) != (
                    self.engine, self.data.batch_size, self.optim.clip_grad):
                try:  # the stage changes what DeepSpeed gets (super().check() saw the run's)
                    config.check()
                except ValueError as e:
                    raise ConfigError(f"tstl.{stage}: {e}") from None

    def check_weights(self) -> None:
        """What training needs besides ``check()``: weights to start from in every stage (its
        ``model.init``, then ``tstl.init``); the stages' frozen part comes from them. Raises
        ``ConfigError``."""
        bare = [s for s in ("selector", "expert")
                if not self.tstl.init and not self.stage_base(s).model.init]
        if bare:
            where = f"tstl.{bare[0]}: " if len(bare) == 1 else ""
            raise ConfigError(
                f"{where}TSTL needs weights to start from: give tstl.init=[<trained B-CAST run or "
                "checkpoint>] (TSTL starts from a CAST; make train-tstl CAST=...) and/or "
                "model.init=[<pre-trained backbones>]; their frozen part is shared by every stage")

    def stage_base(self, stage: str, defaults: dict[str, Any] | None = None) -> TrainConfig:
        """The run config with ``defaults`` and then the ``tstl.<stage>`` overrides applied."""
        base = to_dict(self)
        base.pop("tstl")
        return with_overrides(base, merge(defaults or {}, getattr(self.tstl, stage)),
                              f"tstl.{stage}")


def with_overrides(base: TrainConfig | dict[str, Any], overrides: dict[str, Any],
                   source: str) -> TrainConfig:
    """A new, validated ``TrainConfig``: ``base`` with the nested mapping ``overrides``
    merged in."""
    data = to_dict(base) if not isinstance(base, dict) else base
    return from_dict(TrainConfig, merge(data, overrides), source=source)
