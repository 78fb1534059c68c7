"""Layers and helpers shared by the model families (written once here)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

M = TypeVar("M", bound=nn.Module)


class LayerNorm(nn.LayerNorm):
    """LayerNorm that computes in at least float32 and returns the input dtype (safe
    under bf16/fp16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        w = self.weight.to(dtype) if self.weight is not None else None
        b = self.bias.to(dtype) if self.bias is not None else None
        return F.layer_norm(x.to(dtype), self.normalized_shape, w, b, self.eps).to(x.dtype)


def build_variant(cls: type[M], family: str, defaults: dict[str, Any], **kwargs: Any) -> M:
    """Build ``cls`` from a variant's architecture ``defaults`` updated by the caller's ``kwargs``.

    Raises:
        TypeError: a keyword is not an argument of ``cls`` (named, with the accepted ones).
    """
    accepted = inspect.signature(cls).parameters
    unknown = set(kwargs) - set(accepted)
    if unknown:
        raise TypeError(
            f"unknown {family} arguments: {sorted(unknown)}; accepted: {', '.join(accepted)}")
    args = {**defaults, **kwargs}
    classes, multi = args.get("num_classes"), getattr(cls, "multi_head", False)
    if classes is not None and isinstance(classes, Mapping) != multi:
        kind = "several heads: num_classes maps head -> classes" if multi else "one head"
        raise ValueError(f"{family} has {kind}, got num_classes={classes!r}; a multi-head "
                         "shard set (EPIC-KITCHENS) needs a multi-head model "
                         "(bcast_compo_vit_b16), a one-label set a one-head model")
    return cls(**args)
