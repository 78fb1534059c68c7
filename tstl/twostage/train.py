"""Two-stage training: the stage-1 selector, then every stage-2 expert, each an ordinary
``Trainer`` run.

Every stage goes through the same loader, DeepSpeed engine and checkpointing as ``make train``; the
stages differ only in their setup (``tstl.twostage.stages``: config, label map, head-row adapter).
The run resumes at any point: a finished stage (its stage file ``selector.pt`` / ``expert.pt``
exists) is skipped, an unfinished one resumes from its own checkpoints.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from tstl.core.config import ConfigError
from tstl.core.shards import INDEX, read_index
from tstl.data.sources import resolve
from tstl.train import dist
from tstl.train.checkpoint import Checkpointer, resolve_weights
from tstl.train.config import TrainConfig
from tstl.train.trainer import Trainer
from tstl.twostage.config import TSTLConfig, with_overrides
from tstl.twostage.groups import ClassGroups, balanced_groups, load_groups, save_groups
from tstl.twostage.stagefile import frozen_sources_from_paths, save_stage_file
from tstl.twostage.stages import (
    Stage,
    expert_file,
    expert_stage,
    pending_experts,
    selector_file,
    selector_stage,
)

logger = logging.getLogger(__name__)


def resolve_groups(cfg: TSTLConfig) -> ClassGroups:
    """The run's class groups: from ``tstl.groups`` or balanced, checked against the shards, pinned
    in the run. Rank 0 reads and writes; every rank gets its answer."""
    return dist.on_main(lambda: _resolve_groups(cfg))


def refuse_multi_head(cfg: TSTLConfig, split: str) -> None:
    """TSTL routes a clip to the expert of its class's group, over the classes of one label: a
    multi-head shard set (EPIC-KITCHENS: verb and noun) is refused (``ConfigError``). Only its
    ``shards.json`` is read; a set listed through ``data.shard_url_template`` is refused by the
    loader instead (TSTL's relabelling of a multi-head set raises there)."""
    try:
        heads = read_index(f"{cfg.shard_dir(split)}/{INDEX}").heads
    except (OSError, ValueError):  # no shard list here: the loader reports it, with the fix
        return
    if heads:
        raise ConfigError(f"{cfg.shard_dir(split)}: TSTL groups the classes of one label, this "
                          f"shard set has the heads {', '.join(heads)} ({cfg.dataset}); train it "
                          "with `make train DATASET=ek100 MODEL=bcast_compo_vit_b16` (TSTL on "
                          "multi-head sets is not supported)")


def _resolve_groups(cfg: TSTLConfig) -> ClassGroups:
    refuse_multi_head(cfg, cfg.train_split)
    num_classes = resolve(cfg.shard_dir(cfg.train_split), cfg.data.shard_url_template).num_classes
    if cfg.tstl.groups:
        groups = load_groups(cfg.tstl.groups)
        source = cfg.tstl.groups
    else:
        groups = balanced_groups(num_classes, cfg.tstl.num_groups)
        source = f"balanced groups (tstl.num_groups={cfg.tstl.num_groups})"
    if num_classes is not None and groups.num_classes != num_classes:
        raise ConfigError(f"{source}: {groups.num_classes} classes, but the shards of "
                          f"{cfg.train_split} have {num_classes}; use a group file made for this "
                          "dataset (make groups)")
    pinned = Path(cfg.out_dir) / "groups.json"
    if pinned.exists():
        if load_groups(pinned).groups != groups.groups:
            raise ConfigError(f"{pinned}: this run was started with other class groups than "
                              f"{source}; finish it with the same groups or start a new run "
                              "(out_dir=...)")
    else:
        save_groups(groups, pinned, "ours")
    return groups


def pin_init(stage: TrainConfig) -> tuple[TrainConfig, dict[str, Any]]:
    """Resolve the stage's ``model.init`` (run folders -> their best checkpoint) to absolute files
    once, when the stage first starts, and keep them (with their SHA-256)
    in ``<stage>/frozen.json``.

    A resumed stage continues from its own checkpoints, whose frozen weights came from the pinned
    files; so the stage file must name those, and a rerun whose ``init`` now resolves to other files
    is refused rather than recorded wrongly. ``init`` is not empty: ``train_two_stage`` checked
    ``TSTLConfig.check_weights``.
    """
    out, pin = Path(stage.out_dir), Path(stage.out_dir) / "frozen.json"

    def decide() -> dict[str, Any]:
        files = [str(Path(resolve_weights(p)[0]).resolve()) for p in stage.model.init]
        if pin.exists() and Checkpointer(out).complete():
            pinned = json.loads(pin.read_text())
            before = [c["path"] for c in pinned["checkpoints"]]
            if before != files:
                raise ConfigError(f"{out} was started from {before} and would now start from "
                                  f"{files}; finish it with the same model.init/tstl.init or "
                                  f"remove {out} to retrain this stage")
            return pinned
        sources = frozen_sources_from_paths(files)
        out.mkdir(parents=True, exist_ok=True)
        tmp = pin.with_suffix(".tmp")
        tmp.write_text(json.dumps(sources, indent=1))
        os.replace(tmp, pin)
        return sources

    sources = dist.on_main(decide)
    files = [c["path"] for c in sources["checkpoints"]]
    return with_overrides(stage, {"model": {"init": files}}, f"{out} pinned init"), sources


def train_stage(stage: Stage, dest: Path, extra: dict[str, Any]) -> None:
    """Train one stage to its end (resuming if it was interrupted), then write its stage
    file (trainable-only)."""
    config, frozen = pin_init(stage.config)
    trainer = Trainer(config, label_map=stage.label_map, weight_adapters=stage.adapters)
    try:
        trainer.train()
        model = trainer.engine.module
        kwargs = {"num_classes": trainer.num_classes, "drop_path_rate": config.model.drop_path_rate,
                  **config.model.kwargs}
        dist.on_main(lambda: save_stage_file(model, dest, config.model.name, kwargs, frozen,
                                             {**extra, "epochs": config.epochs,
                                              "run": config.out_dir}))
        logger.info("wrote %s", dest)
    finally:
        trainer.close()


def _release_memory() -> None:
    """Between stages: the finished stage's engine, optimizer state and loader workers go before the
    next starts."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_two_stage(cfg: TSTLConfig) -> ClassGroups:
    """Stage 1 (selector on group labels), then stage 2 (one expert per group); finished stages
    are skipped."""
    cfg.check_weights()  # the rest of the config was checked when it loaded (TSTLConfig.check)
    dist.init()  # before anything is written: only rank 0 writes the run's shared files
    groups = resolve_groups(cfg)
    out = Path(cfg.out_dir)
    logger.info("TSTL run %s: %d classes in %d groups (sizes %s)", out, groups.num_classes,
                groups.num_groups, [len(g) for g in groups.groups])
    # rank 0 decides what is finished, so that every rank runs the same stages in the same order
    selector_done, todo = dist.on_main(
        lambda: (selector_file(out).exists(), pending_experts(groups, out)))
    if selector_done:
        logger.info("stage 1: %s exists, selector already trained", selector_file(out))
    else:
        logger.info("stage 1: training the selector over %d groups", groups.num_groups)
        train_stage(selector_stage(cfg, groups), selector_file(out), {"role": "selector"})
        _release_memory()
    logger.info("stage 2: %d of %d experts to train%s", len(todo), groups.num_groups,
                f" (finished: {sorted(set(range(groups.num_groups)) - set(todo))})"
                if len(todo) < groups.num_groups else "")
    for g in todo:
        logger.info("stage 2: expert %d of %d, classes %s", g, groups.num_groups,
                    list(groups.groups[g]))
        train_stage(expert_stage(cfg, groups, g), expert_file(out, g),
                  {"role": "expert", "group": g, "classes": list(groups.groups[g])})
        _release_memory()
    return groups
