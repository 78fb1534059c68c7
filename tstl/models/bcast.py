"""B-CAST: a frozen CLIP ViT spatial expert and a frozen VideoMAE ViT temporal expert joined by
bidirectional bottleneck cross-attention and adapters.

Paper: "CAST: Cross-Attention in Space and Time for Video Action Recognition" (Lee et al., NeurIPS
2023), reference code KHU-VLL/CAST (``bidir_vit_base_patch16_224``). Parameter names follow the
reference exactly, so CAST and TSTL checkpoints load without any key mapping; OpenAI CLIP and
VideoMAE checkpoints are mapped in ``convert_checkpoint``.

Deliberate deviations from the reference (numerics at inference are identical;
see tests/models/test_bcast.py):

* The spatial stream is kept batch-first (``[B*T', N, D]``) instead of CLIP's sequence-first layout,
  which saves a permute per block; attention is computed per frame either way.
* All attention goes through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels
  on GPU).
* Layer norms compute in at least float32 and cast back, so the model runs in bf16 and fp16 (the
  reference's CLIP LayerNorm has no bf16 branch).
* Drop path on the spatial stream drops per sample; the reference drops per *token* across the batch
  because its drop-path sees the sequence-first tensor (dim 0 = tokens). Only training with drop
  path > 0 is affected.
* Frozen experts have ``requires_grad=False`` from construction and activation checkpointing is
  optional (``set_grad_checkpointing``).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath
from timm.models.vision_transformer import init_weights_vit_timm
from torch.utils.checkpoint import checkpoint

from tstl.models.contract import Conversion, VideoClassifier
from tstl.models.layers import LayerNorm, build_variant
from tstl.models.layouts import hf_prefixed, identify, unsupported
from tstl.models.registry import register_model

# A parameter is trained iff its name contains one of these (the reference's rule, minus patterns
# that match nothing). ``clip_space_pos``/``vmae_space_pos`` are caught by "cross"
# through ``s2t_cross``.
TRAINABLE_PATTERNS = ("cross", "clip_time_pos", "vmae_time_pos", "Adapter", "ln_post",
                      "vmae_fc_norm", "head")
NO_WEIGHT_DECAY = ("clip_time_pos", "clip_space_pos", "vmae_space_pos", "vmae_time_pos")
logger = logging.getLogger(__name__)

_CLIP_KEYS = re.compile(r"^(clip_|blocks\.\d+\.clip_)")
_VMAE_KEYS = re.compile(r"^(patch_embed\.|blocks\.\d+\.(norm1|attn|norm2|mlp)\.)")


class QuickGELU(nn.Module):
    """CLIP's activation: x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Adapter(nn.Module):
    """Bottleneck adapter ``fc2(GELU(fc1(x)))``, plus ``x`` when ``skip``."""

    def __init__(self, dim: int, ratio: float = 0.25, skip: bool = True) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.skip = skip
        self.D_fc1 = nn.Linear(dim, hidden)
        self.D_fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.D_fc2(F.gelu(self.D_fc1(x)))
        return x + delta if self.skip else delta


class ClipAttention(nn.Module):
    """CLIP's multi-head self-attention with ``nn.MultiheadAttention``'s parameter names,
    batch-first, via SDPA."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(F.linear(x, self.in_proj_weight, self.in_proj_bias),
                            "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        return self.out_proj(
            rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))


class VideoMAEAttention(nn.Module):
    """VideoMAE attention: bias-free qkv with separate q and v biases (k has none), via SDPA."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        q, k, v = rearrange(F.linear(x, self.qkv.weight, bias), "b n (three h d) -> three b h n d",
                            three=3, h=self.num_heads)
        return self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))


class ClipMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden)
        self.gelu = QuickGELU()
        self.c_proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def _cross_attention(q: torch.Tensor, kv: torch.Tensor, num_heads: int) -> torch.Tensor:
    q = rearrange(q, "b n (h d) -> b h n d", h=num_heads)
    k, v = rearrange(kv, "b n (two h d) -> two b h n d", two=2, h=num_heads)
    return rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")


class T2SCross(nn.Module):
    """Temporal -> spatial: CLIP patch tokens attend along time to the VideoMAE tokens at the
    same location.

    The CLS token of each frame passes through unchanged.
    """

    def __init__(self, dim: int, num_heads: int, frames: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.clip_time_pos = nn.Parameter(torch.randn(frames, dim) * (dim // num_heads) ** -0.5)
        self.vmae_time_pos = nn.Parameter(torch.randn(frames, dim) * (dim // num_heads) ** -0.5)
        self.t2s_q = nn.Linear(dim, dim, bias=False)
        self.t2s_q_bias = nn.Parameter(torch.zeros(dim))
        self.t2s_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.t2s_kv_bias = nn.Parameter(torch.zeros(2 * dim))
        self.t2s_proj = nn.Linear(dim, dim)

    def forward(self, s: torch.Tensor, t: torch.Tensor, frames: int) -> torch.Tensor:
        """s: [B*T', 1+P, d] CLIP tokens; t: [B, T'*P, d] VideoMAE tokens -> [B*T', 1+P, d]."""
        cls, patches = s[:, :1], s[:, 1:]
        p = patches.shape[1]
        q = rearrange(patches, "(b t) p d -> (b p) t d", t=frames) + self.clip_time_pos
        kv = rearrange(t, "b (t p) d -> (b p) t d", p=p) + self.vmae_time_pos
        out = _cross_attention(F.linear(q, self.t2s_q.weight, self.t2s_q_bias),
                               F.linear(kv, self.t2s_kv.weight, self.t2s_kv_bias), self.num_heads)
        out = rearrange(self.t2s_proj(out), "(b p) t d -> (b t) p d", p=p)
        return torch.cat([cls, out], dim=1)


class S2TCross(nn.Module):
    """Spatial -> temporal: VideoMAE tokens attend over space to the CLIP patch tokens of the
    paired frame.

    The output projection is named ``t2s_proj`` as in the reference checkpoints.
    """

    def __init__(self, dim: int, num_heads: int, patches: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.clip_space_pos = nn.Parameter(torch.randn(patches, dim) * (dim // num_heads) ** -0.5)
        self.vmae_space_pos = nn.Parameter(torch.randn(patches, dim) * (dim // num_heads) ** -0.5)
        self.s2t_q = nn.Linear(dim, dim, bias=False)
        self.s2t_q_bias = nn.Parameter(torch.zeros(dim))
        self.s2t_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.s2t_kv_bias = nn.Parameter(torch.zeros(2 * dim))
        self.t2s_proj = nn.Linear(dim, dim)

    def forward(self, s: torch.Tensor, t: torch.Tensor, frames: int) -> torch.Tensor:
        """s: [B*T', 1+P, d]; t: [B, T'*P, d] -> [B, T'*P, d]."""
        q = rearrange(t, "b (t p) d -> (b t) p d", t=frames) + self.vmae_space_pos
        kv = s[:, 1:] + self.clip_space_pos
        out = _cross_attention(F.linear(q, self.s2t_q.weight, self.s2t_q_bias),
                               F.linear(kv, self.s2t_kv.weight, self.s2t_kv_bias), self.num_heads)
        return rearrange(self.t2s_proj(out), "(b t) p d -> b (t p) d", t=frames)


class Block(nn.Module):
    """One layer advancing both streams: attention + adapters, bidirectional cross-attention,
    MLP + adapters."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, frames: int, patches: int,
                 down_ratio: int, adapter_ratio: float, drop_path: float) -> None:
        super().__init__()
        hidden, cross_dim = int(dim * mlp_ratio), dim // down_ratio
        self.clip_ln_1 = LayerNorm(dim, eps=1e-5)
        self.clip_attn = ClipAttention(dim, num_heads)
        self.S_Adapter = Adapter(dim, adapter_ratio, skip=True)
        self.norm1 = LayerNorm(dim, eps=1e-6)
        self.attn = VideoMAEAttention(dim, num_heads)
        self.T_Adapter = Adapter(dim, adapter_ratio, skip=True)
        self.cross_s_down = nn.Linear(dim, cross_dim)
        self.cross_t_down = nn.Linear(dim, cross_dim)
        self.ln_s_cross = LayerNorm(cross_dim, eps=1e-6)
        self.ln_t_cross = LayerNorm(cross_dim, eps=1e-6)
        self.t2s_cross = T2SCross(cross_dim, num_heads, frames)
        self.s2t_cross = S2TCross(cross_dim, num_heads, patches)
        self.cross_s_up = nn.Linear(cross_dim, dim)
        self.cross_t_up = nn.Linear(cross_dim, dim)
        self.clip_ln_2 = LayerNorm(dim, eps=1e-5)
        self.clip_mlp = ClipMlp(dim, hidden)
        self.S_MLP_Adapter = Adapter(dim, adapter_ratio, skip=False)
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden)
        self.T_MLP_Adapter = Adapter(dim, adapter_ratio, skip=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.frames = frames

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = s + self.S_Adapter(self.clip_attn(self.clip_ln_1(s)))
        t = t + self.T_Adapter(self.attn(self.norm1(t)))
        ns = self.ln_s_cross(self.cross_s_down(s))
        nt = self.ln_t_cross(self.cross_t_down(t))
        # Both directions read the same pre-update tokens.
        c_s = self.cross_s_up(F.gelu(self.t2s_cross(ns, nt, self.frames)))
        c_t = self.cross_t_up(F.gelu(self.s2t_cross(ns, nt, self.frames)))
        s = s + self.drop_path(c_s)
        t = t + self.drop_path(c_t)
        h = self.clip_ln_2(s)
        s = s + self.clip_mlp(h) + self.drop_path(0.5 * self.S_MLP_Adapter(h))
        h = self.norm2(t)
        t = t + self.mlp(h) + self.drop_path(0.5 * self.T_MLP_Adapter(h))
        return s, t


def sinusoid_table(n: int, dim: int) -> torch.Tensor:
    """The fixed 1-D sine/cosine position table VideoMAE adds to its tokens: [1, n, dim]."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    div = torch.pow(10000.0, 2 * (torch.arange(dim) // 2).double() / dim)
    table = pos / div
    table[:, 0::2] = torch.sin(table[:, 0::2])
    table[:, 1::2] = torch.cos(table[:, 1::2])
    return table.float()[None]


class BCAST(VideoClassifier):
    """B-CAST video classifier. Input ``[B, 3, T, H, W]`` (normalised), output logits
    ``[B, num_classes]``.

    ``num_classes=0`` builds no head (``forward`` returns the fused pooled features
    ``[B, embed_dim]``).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, num_frames: int = 16,
                 num_classes: int = 400, tubelet_size: int = 2, down_ratio: int = 2,
                 adapter_ratio: float = 0.25, drop_path_rate: float = 0.0,
                 head_drop_rate: float = 0.0, init_scale: float = 1.0) -> None:
        super().__init__()
        if num_frames % tubelet_size or img_size % patch_size:
            raise ValueError(
                "num_frames must be a multiple of tubelet_size and img_size of patch_size")
        self.num_classes, self.num_frames, self.tubelet_size = num_classes, num_frames, tubelet_size
        self.embed_dim, self.img_size, self.init_scale = embed_dim, img_size, init_scale
        self.clip_frames = num_frames // tubelet_size
        patches = (img_size // patch_size) ** 2
        self.clip_conv1 = nn.Conv2d(3, embed_dim, patch_size, patch_size, bias=False)
        self.clip_class_embedding = nn.Parameter(embed_dim**-0.5 * torch.randn(embed_dim))
        self.clip_positional_embedding = nn.Parameter(
            embed_dim**-0.5 * torch.randn(patches + 1, embed_dim))
        self.clip_ln_pre = LayerNorm(embed_dim, eps=1e-5)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(3, embed_dim, (tubelet_size, patch_size, patch_size),
                                          (tubelet_size, patch_size, patch_size))
        # Fixed, never saved or loaded (as in VideoMAE): a non-persistent buffer so it
        # follows .to()/.double().
        self.register_buffer("pos_embed", sinusoid_table(self.clip_frames * patches, embed_dim),
                             persistent=False)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, self.clip_frames, patches, down_ratio,
                  adapter_ratio, r)
            for r in rates)
        self.clip_ln_post = LayerNorm(embed_dim, eps=1e-5)
        self.vmae_fc_norm = LayerNorm(embed_dim, eps=1e-6)
        self._build_head(num_classes, adapter_ratio, head_drop_rate)
        self.grad_checkpointing = False
        self._init_weights(init_scale)
        for name, p in self.named_parameters():
            p.requires_grad = any(pat in name for pat in TRAINABLE_PATTERNS)

    def _build_head(self, num_classes: int, adapter_ratio: float, head_drop_rate: float) -> None:
        """What follows the pooled features: a last adapter per stream, their sum, one linear head
        (the compositional variant, ``bcast_compo.py``, builds its two heads here instead)."""
        self.noun_last_Adapter = Adapter(self.embed_dim, adapter_ratio, skip=False)
        self.verb_last_Adapter = Adapter(self.embed_dim, adapter_ratio, skip=False)
        self.head_dropout = nn.Dropout(head_drop_rate)
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _init_weights(self, init_scale: float) -> None:
        # Linear: truncated normal (std 0.02), zero bias; LayerNorms keep (1, 0)
        for m in self.modules():
            init_weights_vit_timm(m, needs_reset=False)
        for name, m in self.blocks.named_modules():
            # Adapters and up-projections start at zero, so at initialisation both streams are the
            # pure experts.
            if isinstance(m, Adapter):
                nn.init.zeros_(m.D_fc2.weight)
                nn.init.zeros_(m.D_fc2.bias)
            elif isinstance(m, nn.Linear) and "up" in name.rsplit(".", 1)[-1]:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
        self._init_head(init_scale)

    def _init_head(self, init_scale: float) -> None:
        """Last adapters' output layer at zero, the head times ``init_scale`` (CAST's rule)."""
        for a in (self.noun_last_Adapter, self.verb_last_Adapter):
            nn.init.zeros_(a.D_fc2.weight)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(init_scale)
                self.head.bias.mul_(init_scale)

    # ----------------------------------------------------------------------------- forward

    def _stems(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if (x.shape[2] != self.num_frames or x.shape[-1] != self.img_size
                or x.shape[-2] != self.img_size):
            raise ValueError(f"B-CAST expects [B, 3, {self.num_frames}, {self.img_size}, "
                             f"{self.img_size}] clips, got {list(x.shape)} (CLIP's position table "
                             "is not interpolated)")
        # CLIP sees the last frame of every VideoMAE tubelet (frames 1, 3, 5, ... for tubelets
        # of 2).
        frames = rearrange(x[:, :, self.tubelet_size - 1 :: self.tubelet_size],
                           "b c t h w -> (b t) c h w")
        s = self.clip_conv1(frames).flatten(2).transpose(1, 2)
        cls = self.clip_class_embedding.to(s.dtype).expand(s.shape[0], 1, -1)
        s = self.clip_ln_pre(torch.cat([cls, s], dim=1)
                             + self.clip_positional_embedding.to(s.dtype))
        t = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = t + self.pos_embed.to(t.dtype)
        return s, t

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features of both streams: (spatial [B, D], temporal [B, D])."""
        s, t = self._stems(x)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                s, t = checkpoint(blk, s, t, use_reentrant=False)
            else:
                s, t = blk(s, t)
        s = rearrange(s[:, 0], "(b t) d -> b t d", t=self.clip_frames).mean(1)
        return self.clip_ln_post(s), self.vmae_fc_norm(t.mean(1))

    def forward_head(self, feats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        s, t = feats
        return self.head(self.head_dropout(self.noun_last_Adapter(s) + self.verb_last_Adapter(t)))

    # ----------------------------------------------------------------------------- training helpers

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A new head with ``num_classes`` outputs (0: none), initialised as the constructor's:
        truncated normal (std 0.02) times ``init_scale``, zero bias; trainable, on the old head's
        device and dtype."""
        old = next(self.head.parameters(), None)
        kw = {"device": old.device, "dtype": old.dtype} if old is not None else {}
        self.num_classes = num_classes
        self.head = (nn.Linear(self.embed_dim, num_classes, **kw) if num_classes > 0
                     else nn.Identity())
        if num_classes > 0:
            init_weights_vit_timm(self.head, needs_reset=False)
            with torch.no_grad():
                self.head.weight.mul_(self.init_scale)
                self.head.bias.mul_(self.init_scale)

    def no_weight_decay(self) -> set[str]:
        """Cross-attention position tables (biases and norms are excluded from decay by
        their shape)."""
        return {n for n, _ in self.named_parameters() if any(p in n for p in NO_WEIGHT_DECAY)}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm-style layer groups as CAST's ``get_num_layer_for_vit``: stems = 0, block i = i + 1,
        the rest (``clip_ln_post``, ``vmae_fc_norm``, the last adapters, the head) unmatched, hence
        the top id."""
        return {
            "stem": r"^clip_conv1|^clip_class_embedding|^clip_positional_embedding|^clip_ln_pre"
                    r"|^patch_embed",
            "blocks": [(r"^blocks\.(\d+)", None)],
        }

    # ----------------------------------------------------------------------------- checkpoints

    def convert_checkpoint(self, state_dict: dict[str, torch.Tensor]) -> Conversion:
        """Map an OpenAI CLIP, VideoMAE (pre-trained or fine-tuned; original or Hugging Face) or
        CAST/TSTL state dict onto this model.

        Raises:
            UnsupportedLayoutError: a layout B-CAST cannot take (TimeSformer, an image ViT,
            unknown). ValueError: Hugging Face VideoMAE weights whose query/value biases were
            dropped by a conversion.
        """
        if any(k.startswith("module.") for k in state_dict):
            state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
        layout = identify(state_dict)
        if layout == "cast":
            return Conversion(state_dict, "cast")
        if layout == "openai-clip":
            return self._from_clip(state_dict)
        if layout in ("videomae-pretrain", "videomae-finetune"):
            return self._from_videomae(state_dict)
        if layout == "hf-videomae":
            original = _hf_videomae_to_original(hf_prefixed(state_dict, "videomae"))
            conv = self._from_videomae(original)
            conv.format = "hf-videomae"
            return conv
        raise unsupported(layout, "B-CAST", "OpenAI CLIP, VideoMAE (original or Hugging Face) and "
                                            "CAST/TSTL weights")

    def _other_keys(self, belongs: re.Pattern, why: str) -> dict[str, str]:
        """Model keys outside one expert: a checkpoint of that expert is known not to provide them.
        Keys of the expert itself stay unexplained, so a checkpoint that lacks some of them fails a
        strict load."""
        return {k: why for k in self.state_dict() if not belongs.match(k)}

    def _from_clip(self, sd: dict[str, torch.Tensor]) -> Conversion:
        visual = any(k.startswith("visual.") for k in sd)
        out, dropped = {}, {}
        for k, v in sd.items():
            if visual and not k.startswith("visual."):
                dropped[k] = "CLIP text tower: not used"
                continue
            k = k.removeprefix("visual.")
            if k.startswith("transformer.resblocks."):
                i, rest = k.removeprefix("transformer.resblocks.").split(".", 1)
                out[f"blocks.{i}.clip_{rest}"] = v
            elif k == "proj":
                dropped["proj"] = "CLIP's image projection is not used by B-CAST"
            else:
                out[f"clip_{k}"] = v
        return Conversion(out, "openai-clip",
                          self._other_keys(_CLIP_KEYS, "not part of the CLIP expert"), dropped)

    def _from_videomae(self, sd: dict[str, torch.Tensor]) -> Conversion:
        pretrain = any(k.startswith("encoder.") for k in sd)
        out, dropped = {}, {}
        head = self.head.weight.shape if isinstance(self.head, nn.Linear) else None
        for k, v in sd.items():
            name = k.removeprefix("backbone.").removeprefix("encoder.")
            if k.startswith(("decoder.", "encoder_to_decoder", "mask_token")):
                dropped[k] = "VideoMAE pre-training decoder"
            elif name.startswith(("norm.", "fc_norm.")):
                dropped[k] = ("VideoMAE's final norm: B-CAST keeps vmae_fc_norm at its own "
                              "initialisation (as CAST)")
            elif name.startswith("head."):
                # As CAST: a VideoMAE classifier of the right shape initialises the head, any
                # other is dropped.
                if (head is None or (name == "head.weight" and v.shape != head)
                        or (name == "head.bias" and v.shape[0] != head[0])):
                    dropped[k] = "VideoMAE head of another number of classes"
                else:
                    out[name] = v
            elif name == "pos_embed":
                dropped[k] = "fixed sinusoidal table, not loaded"
            else:
                out[name] = v
        fmt = "videomae-pretrain" if pretrain else "videomae-finetune"
        missing = self._other_keys(_VMAE_KEYS, "not part of the VideoMAE expert")
        missing.update({k: "initialised (the VideoMAE head has another shape)"
                        for k in ("head.weight", "head.bias")
                        if k not in out and head is not None})
        return Conversion(out, fmt, missing, dropped)


# Hugging Face VideoMAE -> the original VideoMAE names, per layer (after
# ``videomae.encoder.layer.<i>.``). The query/key/value Linears are packed into VideoMAE's one
# bias-free qkv (q, k, v rows in that order, as transformers' convert_videomae_to_pytorch.py splits
# it); the biases are q_bias/v_bias in hub files (transformers 4 layout, which save_pretrained still
# writes) and query.bias/value.bias in a transformers 5 model's own state_dict().
_HF_VMAE_LAYER = {
    "layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
    "attention.attention.q_bias": "attn.q_bias", "attention.attention.v_bias": "attn.v_bias",
    "attention.attention.query.bias": "attn.q_bias",
    "attention.attention.value.bias": "attn.v_bias",
}
_HF_VMAE_TOP = {
    "videomae.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "videomae.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "videomae.layernorm.weight": "norm.weight", "videomae.layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight", "classifier.bias": "head.bias",
}
_HF_VMAE_KEY = re.compile(r"videomae\.encoder\.layer\.(\d+)\.(.+?)(\.weight|\.bias)?")


def _hf_videomae_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ``VideoMAEModel`` / ``...ForVideoClassification`` / ``...ForPreTraining`` names
    -> VideoMAE's.

    A key bias (``key.bias``, which transformers never creates) is dropped: it adds ``q . b`` to
    every score of a query, and softmax ignores a constant shift. Pre-training keys move under
    ``decoder.``-style names that ``_from_videomae`` drops; any other key keeps its name and fails a
    strict load.

    Raises:
        ValueError: a layer has no query/value biases: the conversion that wrote the file dropped
        them.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = _HF_VMAE_KEY.fullmatch(k)
        if m is None:
            out[_HF_VMAE_TOP.get(k, k)] = v
            continue
        i, name, leaf = m[1], m[2], m[3] or ""
        if name in (f"attention.attention.{p}" for p in ("query", "key", "value")):
            if leaf == ".weight":
                qkv.setdefault(i, {})[name.rsplit(".", 1)[1]] = v
                continue
            if name.endswith(".key"):
                continue  # softmax-invariant (see the docstring)
        target = _HF_VMAE_LAYER.get(name + leaf) or _HF_VMAE_LAYER.get(name)
        out[f"blocks.{i}.{target}{'' if target.endswith('_bias') else leaf}" if target else k] = v
    for i, parts in qkv.items():
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([parts["query"], parts["key"],
                                                         parts["value"]])
    _check_qv_biases(out, sorted(qkv, key=int))
    return out


def _check_qv_biases(sd: dict[str, torch.Tensor], layers: list[str]) -> None:
    """Refuse a VideoMAE without query/value biases; warn when every one is exactly zero (a trained
    VideoMAE's never are: a loader that did not know the names left them at their zero
    initialisation)."""
    lacking = [i for i in layers
               if f"blocks.{i}.attn.q_bias" not in sd or f"blocks.{i}.attn.v_bias" not in sd]
    if lacking:
        raise ValueError(
            "Hugging Face VideoMAE weights without query/value biases (q_bias/v_bias) in layers "
            f"{lacking}: the conversion that wrote this file dropped them (VideoMAE has q and v "
            "biases in every layer; some transformers 5 releases did not map the hub files' "
            "q_bias/v_bias). Without them the temporal expert "
            "computes other features; use the original hub snapshot (its weights file has "
            "...attention.attention.q_bias) or the original VideoMAE checkpoint")
    biases = [sd[f"blocks.{i}.attn.{b}"] for i in layers for b in ("q_bias", "v_bias")]
    if biases and not any(t.is_meta for t in biases) and not any(bool(t.any()) for t in biases):
        logger.warning("Hugging Face VideoMAE weights whose query/value biases are all exactly "
                       "zero: "
                       "probably a conversion that dropped VideoMAE's q_bias/v_bias (a trained "
                       "VideoMAE's are never all "
                       "zero); prefer the original hub snapshot or VideoMAE checkpoint")


def _build(defaults: dict, **kwargs) -> BCAST:
    return build_variant(BCAST, "B-CAST", defaults, **kwargs)


@register_model
def bcast_vit_b16(**kwargs) -> BCAST:
    """CAST's ``bidir_vit_base_patch16_224``: CLIP ViT-B/16 + VideoMAE ViT-B, 16 frames at
    224 px."""
    return _build(
        dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_frames=16),
        **kwargs)


@register_model
def bcast_test(**kwargs) -> BCAST:
    """Tiny B-CAST for tests and CPU demos: 32 px, 4 frames, width 64, depth 2."""
    return _build(dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_frames=4,
                       num_classes=8), **kwargs)


@register_model
def bcast_small_demo(**kwargs) -> BCAST:
    """Small B-CAST the CPU demo trains in minutes: 32 px, 4 px patches, 8 frames, width 64,
    depth 2."""
    return _build(dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_frames=8,
                       num_classes=8), **kwargs)

