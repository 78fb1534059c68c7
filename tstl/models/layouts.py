"""Which checkpoint layout a state dict is in, and which model family takes it.

Sniffed from key names (and the patch embedding's rank) only, so it works on tensors on the ``meta``
device (the preflight reads no weights). Each family's ``convert_checkpoint`` accepts its own
layouts and raises ``UnsupportedLayoutError`` for any other, naming the model that does take it;
that is the "wrong family" error the preflight reports (a TimeSformer checkpoint given to B-CAST, a
CAST file given to TimeSformer, ...).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

__all__ = ["LAYOUTS", "UnsupportedLayoutError", "hf_prefixed", "identify", "strip_wrapper_prefix",
           "unsupported"]


class UnsupportedLayoutError(ValueError):
    """A state dict whose layout the model's family cannot take (or no known layout); ``layout``
    names it."""

    def __init__(self, message: str, layout: str) -> None:
        super().__init__(message)
        self.layout = layout


# layout -> (what it is, the models that take it)
LAYOUTS: dict[str, tuple[str, str]] = {
    "cast": ("a B-CAST model (CAST / TSTL selector or expert)", "bcast_vit_b16"),
    "openai-clip": ("an OpenAI CLIP model", "bcast_vit_b16 (its spatial expert)"),
    "videomae-pretrain": ("a VideoMAE pre-training checkpoint (encoder + decoder)",
                          "bcast_vit_b16 (its temporal expert)"),
    "videomae-finetune": ("a fine-tuned VideoMAE ViT", "bcast_vit_b16 (its temporal expert)"),
    "hf-videomae": ("a Hugging Face VideoMAE model (VideoMAEModel / ...ForVideoClassification / "
                    "...ForPreTraining)", "bcast_vit_b16 (its temporal expert)"),
    "timesformer": ("a TimeSformer model (official .pyth layout)",
                    "timesformer_vit_b16 / timesformer_hr_vit_b16 / timesformer_l_vit_b16"),
    "hf-timesformer": ("a Hugging Face TimesformerForVideoClassification model",
                       "timesformer_vit_b16 / timesformer_hr_vit_b16 / timesformer_l_vit_b16"),
    "timm-vit": ("an image ViT (timm / ImageNet layout)",
                 "timesformer_* (ImageNet initialisation)"),
    "unknown": ("no layout tstl knows", "none: docs/models.md lists the supported files"),
}


_PATCH = r"(backbone\.)?patch_embed\.proj\.weight"
_VIT_QKV = r"blocks\.\d+\.attn\.qkv\.weight"


def strip_wrapper_prefix(key: str) -> str:
    """Drop the DDP ``module.`` and PySlowFast's ``model.`` prefixes (one of each, that order)."""
    return key.removeprefix("module.").removeprefix("model.")


def identify(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The layout of ``state_dict`` (a key of ``LAYOUTS``), from its key names and the patch
    embedding's rank."""
    keys = {strip_wrapper_prefix(k) for k in state_dict}
    if any(".clip_attn." in k for k in keys):
        return "cast"
    if any(k.startswith("timesformer.") for k in keys):
        return "hf-timesformer"
    if any(k.startswith("videomae.") for k in keys):
        return "hf-videomae"
    # a bare TimesformerModel / VideoMAEModel (saved without their base_model_prefix)
    if any(k.startswith("embeddings.patch_embeddings.") for k in keys):
        return "hf-timesformer" if "embeddings.cls_token" in keys else "hf-videomae"
    if any(k.startswith("visual.") for k in keys) or "conv1.weight" in keys:
        return "openai-clip"
    if "time_embed" in keys or any(".temporal_attn." in k for k in keys):
        return "timesformer"
    if any(k.startswith("encoder.patch_embed.") for k in keys):
        return "videomae-pretrain"
    patch = next((v for k, v in state_dict.items()
                  if re.fullmatch(_PATCH, strip_wrapper_prefix(k))), None)
    if patch is not None and patch.ndim == 5:  # Conv3d tubelets
        return "videomae-finetune"
    if "cls_token" in keys and any(re.fullmatch(_VIT_QKV, k) for k in keys):
        return "timm-vit"
    return "unknown"


def hf_prefixed(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A bare Hugging Face base model's keys (``TimesformerModel``/``VideoMAEModel`` save without
    their ``base_model_prefix``) under ``prefix.``, as the task models'
    (``...ForVideoClassification``) keys are."""
    if any(k.startswith(prefix + ".") for k in state_dict):
        return dict(state_dict)
    return {f"{prefix}.{k}": v for k, v in state_dict.items()}


def unsupported(layout: str, family: str, takes: str) -> UnsupportedLayoutError:
    """The error a ``family`` model raises for a ``layout`` it cannot take (``takes``: what it does
    take)."""
    what, where = LAYOUTS.get(layout, LAYOUTS["unknown"])
    if layout == "unknown":
        msg = f"unrecognised checkpoint layout: {family} takes {takes}"
    else:
        msg = (f"this is {what}, which {family} cannot take ({family} takes {takes}); it loads "
               f"into {where}")
    return UnsupportedLayoutError(msg, layout)
