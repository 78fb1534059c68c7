"""Building what a run needs from its config: the model with its initial weights, and the
compute dtype.

Training (``Trainer``) and every evaluation (``evaluate_checkpoint``, TSTL's ``evaluate_tstl``) use
these, so a model is built, loaded and run the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tstl.core.config import ConfigError
from tstl.models import create_model, load_checkpoint
from tstl.models.checkpoint import StateDictAdapter
from tstl.train.checkpoint import resolve_weights
from tstl.train.config import ModelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype inputs and weights are cast to, in training and in every evaluation:
    ``engine.precision`` on every device (an evaluation sees the numbers training saw). fp16 needs a
    GPU (CPU kernels for it are missing or slow).
    """
    if precision not in DTYPES:
        raise ConfigError(f"engine.precision: expected one of {sorted(DTYPES)}, got {precision!r}")
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError(
            "engine.precision=fp16 needs a GPU; use engine.precision=bf16 or fp32 on CPU")
    return DTYPES[precision]


def build_model(cfg: ModelConfig, num_classes: int,
                adapters: Sequence[StateDictAdapter] = ()) -> tuple[nn.Module, list[str]]:
    """The model with its initial weights; returns it and where each part of the weights came from.

    Every ``cfg.init`` entry (a checkpoint file, a DeepSpeed tag folder or a run folder: its best
    checkpoint) is loaded in order; a head of another number of classes is re-initialised.
    ``adapters`` are passed to every ``load_checkpoint`` (e.g. TSTL's head-row
    selection, ``tstl.twostage.stages.head_rows``).
    """
    model = create_model(cfg.name, num_classes=num_classes, drop_path_rate=cfg.drop_path_rate,
                         **cfg.kwargs)
    provenance = [f"{cfg.name}: random initialisation (seeded)"]
    for entry in cfg.init:
        path, _ = resolve_weights(entry)
        # a checkpoint with another number of classes (a CAST model as a TSTL selector or expert)
        # starts a new head
        report = load_checkpoint(model, path, reinit_mismatched=("head.",),
                                 adapters=tuple(adapters), trusted=list(cfg.trusted_checkpoints))
        reinit = [k for k, why in report.explained.items() if why.endswith("re-initialised")
                  and k in report.missing]
        provenance.append(f"{path}: {report.format}, {report.loaded} tensors"
                          + (f" ({', '.join(reinit)} re-initialised: shape differs)" if reinit
                             else ""))
    if not cfg.freeze_pretrained:
        for p in model.parameters():
            p.requires_grad = True
        provenance.append(
            "freeze_pretrained false: every parameter is trained (no pre-trained backbones)")
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model, provenance
