"""TimeSformer: a ViT-B/16 applied to video with divided, joint or space-only self-attention.

Paper: "Is Space-Time Attention All You Need for Video Understanding?" (Bertasius et al., ICML
2021), reference code facebookresearch/TimeSformer (``timesformer/models/vit.py``). Parameter names
follow the reference's inner ``VisionTransformer`` exactly, so official ``.pyth`` files load after
stripping their ``model.`` prefix and timm ImageNet ViT weights load with no renaming;
``convert_checkpoint`` does the resizing and temporal initialisation.

Semantics kept from the reference (checked against it in tests/models/test_timesformer.py):

* Tokens after the time embedding are ordered patch-major, time-minor (index ``n * T + t``).
* Divided attention leaves the cls token out of temporal attention; its spatial update is the mean
  over frames.
* A clip with more frames or pixels than the model was built for uses nearest-resized time (1-D) and
  position (2-D) embeddings at forward time.

Deliberate deviations (identical logits at inference up to rounding):

* Attention goes through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels
  on GPU).
* The divided block regroups tokens with views where the layout allows it (the temporal grouping is
  a view of the patch tokens) instead of one einops copy per regrouping.
* Only the cls token goes through the final norm (LayerNorm is per token, so the result is the
  same), and ``space_only`` averages only the cls token over frames.
* Layer norms compute in at least float32 and cast back, so the model runs in bf16 and fp16.
* Optional activation checkpointing per block (``set_grad_checkpointing``); optimizer helpers follow
  timm (``no_weight_decay``, ``group_matcher``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models.vision_transformer import init_weights_vit_timm
from torch.utils.checkpoint import checkpoint

from tstl.models.contract import Conversion, VideoClassifier
from tstl.models.layers import LayerNorm, build_variant
from tstl.models.layouts import hf_prefixed, identify, strip_wrapper_prefix, unsupported
from tstl.models.registry import register_model

logger = logging.getLogger(__name__)

AttentionType = Literal["divided_space_time", "joint_space_time", "space_only"]
ATTENTION_TYPES: tuple[str, ...] = ("divided_space_time", "joint_space_time", "space_only")


class Attention(nn.Module):
    """Multi-head self-attention with one packed qkv projection (q, k, v outer split, as
    the reference)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads)
                   .permute(2, 0, 3, 1, 4).unbind(0))
        x = F.scaled_dot_product_attention(q, k, v,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Block(nn.Module):
    """Pre-norm transformer block; ``divided_space_time`` adds a temporal attention branch before
    the spatial one."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop: float,
                 attn_drop: float, drop_path: float, attention_type: str) -> None:
        super().__init__()
        self.divided = attention_type == "divided_space_time"
        self.norm1 = LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        if self.divided:
            self.temporal_norm1 = LayerNorm(dim, eps=1e-6)
            self.temporal_attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
            self.temporal_fc = nn.Linear(dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        x = (self._divided(x, num_frames) if self.divided
             else x + self.drop_path(self.attn(self.norm1(x))))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _divided(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Temporal then spatial attention on ``x [B, 1 + N*T, D]`` (patch-major,
        time-minor tokens)."""
        b, _, d = x.shape
        cls, xt = x[:, :1], x[:, 1:]
        n = xt.shape[1] // t
        # Temporal: each patch attends over its T frames; the cls token is left out (as the
        # reference code). Drop path per (b, n) row, temporal_fc after it: the reference's order
        # and granularity.
        r = self.drop_path(self.temporal_attn(self.temporal_norm1(xt.reshape(b * n, t, d))))
        xt = xt + self.temporal_fc(r.reshape(b, n * t, d))
        # Spatial: each frame attends over its N patches plus a copy of the block-entry cls token.
        xs = xt.reshape(b, n, t, d).transpose(1, 2).reshape(b * t, n, d)
        xs = torch.cat((cls.expand(b, t, d).reshape(b * t, 1, d), xs), dim=1)
        s = self.drop_path(self.attn(self.norm1(xs)))
        cls_res = s[:, 0].reshape(b, t, d).mean(dim=1, keepdim=True)
        patch_res = s[:, 1:].reshape(b, t, n, d).transpose(1, 2).reshape(b, n * t, d)
        return torch.cat((cls + cls_res, xt + patch_res), dim=1)


def resize_time_embed(time_embed: torch.Tensor, frames: int) -> torch.Tensor:
    """1-D nearest resize of ``[1, T0, D]`` to ``[1, frames, D]`` (new t takes old floor(t * T0
    / frames))."""
    if time_embed.shape[1] == frames:
        return time_embed
    return F.interpolate(time_embed.transpose(1, 2), size=frames, mode="nearest").transpose(1, 2)


def resize_pos_embed_grid(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """2-D nearest resize of the patch part of a square ``[1, 1 + P*P, D]`` table to ``grid``; cls
    slot kept."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    p = int(patch_pos.shape[1] ** 0.5)
    if (p, p) == tuple(grid):
        return pos_embed
    patch_pos = rearrange(patch_pos, "1 (h w) d -> 1 d h w", h=p, w=p)
    patch_pos = F.interpolate(patch_pos, size=grid, mode="nearest")
    return torch.cat((cls_pos, rearrange(patch_pos, "1 d h w -> 1 (h w) d")), dim=1)


def resize_pos_embed_flat(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """The reference loader's resize: 1-D nearest over the *flattened* patch sequence; cls
    slot kept.

    Not spatially faithful (224 -> 448 maps new row r, column c to old row r//2, column 7*(r%2) +
    c//4), but the released HR models were fine-tuned from ImageNet weights resized this way.
    """
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = F.interpolate(patch_pos.transpose(1, 2), size=num_patches,
                              mode="nearest").transpose(1, 2)
    return torch.cat((cls_pos, patch_pos), dim=1)


class TimeSformer(VideoClassifier):
    """TimeSformer video classifier: ``model(x [B, 3, T, H, W]) -> logits [B, num_classes]``.

    Args:
        img_size: frame size the position table is built for (other sizes are resized at
            forward time).
        patch_size: square patch size.
        in_chans: input channels.
        num_classes: classifier outputs; 0 gives no head (``forward`` returns the features).
        embed_dim: token width.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width over ``embed_dim``.
        qkv_bias: bias on the qkv projection (True in every released model).
        drop_rate: dropout after attention/MLP projections and on the embeddings.
        attn_drop_rate: dropout on attention weights.
        drop_path_rate: stochastic depth of the last block (linear from 0).
        num_frames: frames the time table is built for (other lengths are resized at forward time).
        attention_type: ``divided_space_time``, ``joint_space_time`` or ``space_only``.
        checkpoint_pos_resize: how ``convert_checkpoint`` resizes a position table of another
            length: ``flat`` (the reference loader's 1-D nearest over the flattened sequence) or
            ``grid`` (2-D nearest).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 400, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, num_frames: int = 8,
                 attention_type: AttentionType = "divided_space_time",
                 checkpoint_pos_resize: Literal["flat", "grid"] = "flat") -> None:
        super().__init__()
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(
                f"attention_type must be one of {ATTENTION_TYPES}, got '{attention_type}'")
        if checkpoint_pos_resize not in ("flat", "grid"):
            raise ValueError(
                f"checkpoint_pos_resize must be 'flat' or 'grid', got '{checkpoint_pos_resize}'")
        self.attention_type = attention_type
        self.img_size, self.patch_size, self.num_frames = img_size, patch_size, num_frames
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.checkpoint_pos_resize = checkpoint_pos_resize
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim,
                                      strict_img_size=False)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        if attention_type != "space_only":
            self.time_embed = nn.Parameter(torch.zeros(1, num_frames, embed_dim))
            self.time_drop = nn.Dropout(drop_rate)
        # linear 0 -> drop_path_rate
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i],
                  attention_type)
            for i in range(depth)
        ])
        self.norm = LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        # Linear: truncated normal (std 0.02), zero bias; LayerNorms keep (1, 0)
        for m in self.modules():
            init_weights_vit_timm(m, needs_reset=False)
        # time_embed stays zero and temporal_fc starts at zero in every block, so at initialisation
        # the temporal branch adds nothing and the patch tokens see the (ImageNet) spatial
        # ViT unchanged.
        for blk in self.blocks:
            if blk.divided:
                nn.init.zeros_(blk.temporal_fc.weight)
                nn.init.zeros_(blk.temporal_fc.bias)

    # ----------------------------------------------------------------------------- forward

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Patch, position and time embeddings: ``[B, 3, T, H, W]`` -> tokens and T."""
        b, _, t, h, w = x.shape
        # [(B T), N, D], frame-major per sample
        x = self.patch_embed(rearrange(x, "b c t h w -> (b t) c h w"))
        pos = resize_pos_embed_grid(self.pos_embed, (h // self.patch_size, w // self.patch_size))
        cls = self.pos_drop(self.cls_token + pos[:, :1])
        x = self.pos_drop(x + pos[:, 1:])
        if self.attention_type == "space_only":
            return torch.cat((cls.expand(b * t, -1, -1), x), dim=1), t
        x = (rearrange(x, "(b t) n d -> b n t d", b=b)
             + resize_time_embed(self.time_embed, t).unsqueeze(1))
        x = self.time_drop(x).flatten(1, 2)  # [B, N*T, D], index n*T + t
        # One cls per clip; cls_token + pos[0] is what every frame's cls slot held in the reference.
        return torch.cat((cls.expand(b, -1, -1), x), dim=1), t

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed cls token ``[B, embed_dim]`` (for ``space_only``, the frame average before
        the norm)."""
        b = x.shape[0]
        x, t = self._embed(x)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, t, use_reentrant=False)
            else:
                x = blk(x, t)
        cls = x[:, 0]
        if self.attention_type == "space_only":
            cls = cls.view(b, t, -1).mean(dim=1)
        return self.norm(cls)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        """Logits from the final-normed cls token (the features themselves when
        ``num_classes == 0``)."""
        return self.head(feats)

    # ----------------------------------------------------------------------------- training helpers

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a freshly initialised one with ``num_classes`` outputs (0: no head),
        initialised as the constructor's (truncated normal std 0.02, zero bias), on the old head's
        device and dtype."""
        old = next(self.head.parameters(), None)
        kw = {"device": old.device, "dtype": old.dtype} if old is not None else {}
        self.num_classes = num_classes
        self.head = (nn.Linear(self.embed_dim, num_classes, **kw) if num_classes > 0
                     else nn.Identity())
        if num_classes > 0:
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        """The embedding tables (mmaction2's choice; the reference recipe decays everything)."""
        names = {n for n, _ in self.named_parameters()}
        return {n for n in ("cls_token", "pos_embed", "time_embed") if n in names}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer groups as CAST's ``get_num_layer_for_vit``: embeddings = 0, block i = i + 1, the
        final norm and the head unmatched, hence the top id (timm's ViT merges its norm into the
        last block instead)."""
        return {
            "stem": r"^cls_token|^pos_embed|^time_embed|^patch_embed",
            "blocks": [(r"^blocks\.(\d+)", None)],
        }

    # ----------------------------------------------------------------------------- checkpoints

    def convert_checkpoint(self, state_dict: dict[str, torch.Tensor]) -> Conversion:
        """Map an official TimeSformer, a Hugging Face ``TimesformerForVideoClassification`` or a
        timm/ImageNet ViT state dict onto this model.

        The reference loader's rules: ``model.``/``module.`` prefixes are stripped, a flattened
        patch projection is reshaped to a conv kernel, a head of another size is dropped, the
        position table is resized (``checkpoint_pos_resize``) and the time table 1-D nearest; for
        divided attention, temporal attention and its norm are copied from the spatial ones when the
        checkpoint has none (``temporal_fc`` stays zero). Hugging Face names are mapped one to one
        first (``_HF_RENAMES``; bit-exact, the qkv stays packed).

        Raises:
            UnsupportedLayoutError: a layout TimeSformer cannot take (B-CAST, CLIP, VideoMAE,
            unknown).
        """
        layout = identify(state_dict)
        if layout not in _LAYOUTS:
            raise unsupported(layout, "TimeSformer",
                              "official TimeSformer .pyth, Hugging Face Timesformer and timm ViT "
                              "weights")
        sd = (_from_hf(hf_prefixed(state_dict, "timesformer")) if layout == "hf-timesformer"
              else {strip_wrapper_prefix(k): v for k, v in state_dict.items()})
        fmt = layout if layout in ("hf-timesformer", "timesformer") else "timm-vit"
        own = self.state_dict()
        missing: dict[str, str] = {}
        dropped: dict[str, str] = {}
        w = sd.get("patch_embed.proj.weight")
        if w is not None and w.ndim == 2:  # patchify + linear layout of some ViT ports
            sd["patch_embed.proj.weight"] = w.reshape(w.shape[0], -1, self.patch_size,
                                                      self.patch_size)
        for k in [k for k in sd if k.startswith("pre_logits.")]:
            dropped[k] = ("ImageNet-21k ViT representation layer: TimeSformer has none "
                          "(the reference ignores it too)")
            del sd[k]
        self._convert_head(sd, own, missing, dropped)
        self._convert_embeddings(sd, missing, dropped)
        self._convert_temporal(sd, missing, dropped)
        return Conversion(sd, fmt, missing, dropped)

    def _convert_head(self, sd: dict, own: dict, missing: dict, dropped: dict) -> None:
        if "head.weight" not in sd:
            return
        if "head.weight" in own and own["head.weight"].shape == sd["head.weight"].shape:
            return
        why = f"checkpoint head has {sd['head.weight'].shape[0]} classes, model {self.num_classes}"
        for k in ("head.weight", "head.bias"):
            if k in sd:
                dropped[k] = why + ": dropped"
                del sd[k]
            if k in own:
                missing[k] = why + ": head keeps its initialisation"

    def _convert_embeddings(self, sd: dict, missing: dict, dropped: dict) -> None:
        pos = sd.get("pos_embed")
        hint = _variant_hint(pos, sd.get("time_embed"))
        if pos is not None and pos.shape[1] != self.pos_embed.shape[1]:
            n = self.pos_embed.shape[1] - 1
            logger.info("resizing pos_embed %d -> %d (%s)%s", pos.shape[1], n + 1,
                        self.checkpoint_pos_resize, hint)
            side = int(n ** 0.5)
            sd["pos_embed"] = (resize_pos_embed_flat(pos, n) if self.checkpoint_pos_resize == "flat"
                               else resize_pos_embed_grid(pos, (side, side)))
        if self.attention_type == "space_only":
            if "time_embed" in sd:
                dropped["time_embed"] = "space_only attention has no time embedding"
                del sd["time_embed"]
        elif "time_embed" in sd:
            if sd["time_embed"].shape[1] != self.num_frames:
                logger.info("resizing time_embed %d -> %d (1-D nearest)%s",
                            sd["time_embed"].shape[1], self.num_frames, hint)
            sd["time_embed"] = resize_time_embed(sd["time_embed"], self.num_frames)
        else:
            missing["time_embed"] = ("the checkpoint has no time embedding: it stays zero "
                                     "(as the reference)")

    def _convert_temporal(self, sd: dict, missing: dict, dropped: dict) -> None:
        temporal = [k for k in sd if k.startswith("blocks.") and ".temporal_" in k]
        if self.attention_type != "divided_space_time":
            for k in temporal:
                dropped[k] = (f"divided space-time weights; this model uses {self.attention_type} "
                              "attention")
                del sd[k]
            return
        for i, _blk in enumerate(self.blocks):
            prefix = f"blocks.{i}."
            for spatial, temp in (("attn.", "temporal_attn."), ("norm1.", "temporal_norm1.")):
                for k in [k for k in sd if k.startswith(prefix + spatial)]:
                    sd.setdefault(k.replace(prefix + spatial, prefix + temp, 1), sd[k])
            if prefix + "temporal_fc.weight" not in sd:
                missing[prefix + "temporal_fc."] = ("not in the checkpoint: zero-initialised "
                                                    "(temporal branch off)")


_LAYOUTS = ("timesformer", "hf-timesformer", "timm-vit")

# Hugging Face ``TimesformerForVideoClassification`` -> ours, per block (after
# ``timesformer.encoder.layer.<i>.``); transformers ``convert_timesformer_to_pytorch.py`` is the
# inverse. Bit-exact: the qkv stays one packed Linear.
_HF_BLOCK = {
    "layernorm_before": "norm1", "layernorm_after": "norm2",
    "attention.attention.qkv": "attn.qkv", "attention.output.dense": "attn.proj",
    "temporal_layernorm": "temporal_norm1", "temporal_attention.attention.qkv": "temporal_attn.qkv",
    "temporal_attention.output.dense": "temporal_attn.proj", "temporal_dense": "temporal_fc",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
}
_HF_TOP = {
    "timesformer.embeddings.cls_token": "cls_token",
    "timesformer.embeddings.position_embeddings": "pos_embed",
    "timesformer.embeddings.time_embeddings": "time_embed",
    "timesformer.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "timesformer.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "timesformer.layernorm.weight": "norm.weight", "timesformer.layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight", "classifier.bias": "head.bias",
}
_HF_LAYER = re.compile(r"timesformer\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)")

# (pos_embed length, frames) of the released variants: which model a checkpoint's tables were built
# for
_VARIANTS = {(197, 8): "timesformer_vit_b16", (785, 16): "timesformer_hr_vit_b16",
             (197, 96): "timesformer_l_vit_b16"}


def _from_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face Timesformer names -> ours; a key outside the table keeps its name (and fails a
    strict load)."""
    out = {}
    for k, v in state_dict.items():
        m = _HF_LAYER.fullmatch(k)
        if m and m[2] in _HF_BLOCK:
            out[f"blocks.{m[1]}.{_HF_BLOCK[m[2]]}.{m[3]}"] = v
        else:
            out[_HF_TOP.get(k, k)] = v
    return out


def hf_state_dict(model: TimeSformer) -> dict[str, torch.Tensor]:
    """``model``'s weights under Hugging Face ``TimesformerForVideoClassification`` names (the
    inverse map)."""
    top = {v: k for k, v in _HF_TOP.items()}
    block = {v: k for k, v in _HF_BLOCK.items()}
    out = {}
    for k, v in model.state_dict().items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", k)
        if m:
            out[f"timesformer.encoder.layer.{m[1]}.{block[m[2]]}.{m[3]}"] = v
        else:
            out[top[k]] = v
    return out


def save_hf(model: TimeSformer, folder: str | os.PathLike) -> Path:
    """Write ``model`` as a Hugging Face ``TimesformerForVideoClassification`` folder
    (``config.json`` + ``model.safetensors``) that ``transformers`` loads with ``from_pretrained``
    (same logits; its input is ``[B, T, C, H, W]``). Only what inference needs goes into the config:
    dropout and drop path are 0.

    Raises:
        ValueError: ``space_only`` attention, which transformers runs differently (one logit row per
        frame).
    """
    from safetensors.torch import save_file  # timm's dependency

    if model.attention_type == "space_only":
        raise ValueError("transformers' space_only Timesformer returns one logit row per frame, "
                         "not the frame average: a space_only model has no Hugging Face equivalent")
    blk = model.blocks[0]
    labels = {str(i): f"LABEL_{i}" for i in range(model.num_classes)}
    config = {
        "architectures": ["TimesformerForVideoClassification"], "model_type": "timesformer",
        "image_size": model.img_size, "patch_size": model.patch_size,
        "num_channels": model.patch_embed.proj.in_channels, "num_frames": model.num_frames,
        "hidden_size": model.embed_dim, "num_hidden_layers": len(model.blocks),
        "num_attention_heads": blk.attn.num_heads, "intermediate_size": blk.mlp.fc1.out_features,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02, "layer_norm_eps": blk.norm1.eps,
        "qkv_bias": blk.attn.qkv.bias is not None,
        "attention_type": model.attention_type,
        "drop_path_rate": 0,  # an int: transformers 5.25's TimesformerConfig refuses 0.0
        "id2label": labels, "label2id": {v: int(k) for k, v in labels.items()},
    }
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in hf_state_dict(model).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _variant_hint(pos_embed: torch.Tensor | None, time_embed: torch.Tensor | None) -> str:
    """Which released variant a checkpoint's position and time tables were built for (a log
    suffix)."""
    if pos_embed is None or time_embed is None:
        return ""
    name = _VARIANTS.get((pos_embed.shape[1], time_embed.shape[1]))
    if not name:
        return ""
    return f"; the checkpoint's tables are {name}'s: model.name={name} takes them unresized"


# --------------------------------------------------------------------------------- registry


def _build(defaults: dict, **kwargs) -> TimeSformer:
    return build_variant(TimeSformer, "TimeSformer", defaults, **kwargs)


_VIT_B16 = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_frames=8,
                num_classes=400)


@register_model
def timesformer_vit_b16(**kwargs) -> TimeSformer:
    """TimeSformer ViT-B/16, 8 frames at 224 px (``TimeSformer_divST_8x32_224``);
    pass ``attention_type``."""
    return _build(_VIT_B16, **kwargs)


@register_model
def timesformer_hr_vit_b16(**kwargs) -> TimeSformer:
    """TimeSformer-HR: 16 frames at 448 px (``TimeSformer_divST_16x16_448``)."""
    return _build({**_VIT_B16, "img_size": 448, "num_frames": 16}, **kwargs)


@register_model
def timesformer_l_vit_b16(**kwargs) -> TimeSformer:
    """TimeSformer-L: 96 frames at 224 px (``TimeSformer_divST_96x4_224``)."""
    return _build({**_VIT_B16, "num_frames": 96}, **kwargs)


@register_model
def timesformer_test(**kwargs) -> TimeSformer:
    """Tiny TimeSformer for tests and CPU demos: 32 px, patch 8, 4 frames, width 64, depth 2,
    8 classes."""
    return _build(dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_frames=4,
                       num_classes=8), **kwargs)
