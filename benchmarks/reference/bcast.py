"""A literal, functional restatement of the reference B-CAST forward (KHU-VLL/CAST) and of its
compositional variant, for parity tests and benchmarks.

It follows the reference's formulation step by step: the CLIP stream is sequence-first
(``[N, B*T', D]``) and runs through ``F.multi_head_attention_forward`` like
``nn.MultiheadAttention``; VideoMAE and cross-attention compute ``softmax(q * scale @ k^T) @ v``
explicitly; nothing is fused. It reads weights from a state dict in CAST's key layout, so
``reference_forward(model.state_dict(), x, ...)`` must equal ``model(x)``. Written from the
reference's semantics (see docs/models.md), not copied from it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from tstl.models.bcast import sinusoid_table


def _ln(x: torch.Tensor, sd: dict, name: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def _lin(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def _adapter(x: torch.Tensor, sd: dict, name: str, skip: bool) -> torch.Tensor:
    delta = _lin(F.gelu(_lin(x, sd, f"{name}.D_fc1")), sd, f"{name}.D_fc2")
    return x + delta if skip else delta


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return attn.softmax(dim=-1) @ v


def _vmae_attn(x: torch.Tensor, sd: dict, p: str, heads: int) -> torch.Tensor:
    b, n, _ = x.shape
    bias = torch.cat([sd[f"{p}.q_bias"], torch.zeros_like(sd[f"{p}.v_bias"]), sd[f"{p}.v_bias"]])
    qkv = (F.linear(x, sd[f"{p}.qkv.weight"], bias).reshape(b, n, 3, heads, -1)
           .permute(2, 0, 3, 1, 4))
    out = _attend(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, n, -1)
    return _lin(out, sd, f"{p}.proj")


def _t2s(ns: torch.Tensor, nt: torch.Tensor, sd: dict, p: str, heads: int) -> torch.Tensor:
    b = nt.shape[0]
    t = ns.shape[1] // b
    cls, pat = ns[:1], ns[1:]
    pat = rearrange(pat, "n (b t) d -> (b n) t d", b=b) + sd[f"{p}.clip_time_pos"]
    kv_in = rearrange(nt, "b (t n) d -> (b n) t d", t=t) + sd[f"{p}.vmae_time_pos"]
    q = rearrange(F.linear(pat, sd[f"{p}.t2s_q.weight"], sd[f"{p}.t2s_q_bias"]),
                  "b t (h d) -> b h t d", h=heads)
    kv = rearrange(F.linear(kv_in, sd[f"{p}.t2s_kv.weight"], sd[f"{p}.t2s_kv_bias"]),
                   "b t (e h d) -> e b h t d", e=2, h=heads)
    out = _lin(rearrange(_attend(q, kv[0], kv[1]), "b h t d -> b t (h d)"), sd, f"{p}.t2s_proj")
    out = rearrange(out, "(b n) t d -> n (b t) d", b=b)
    return torch.cat([cls, out], dim=0)


def _s2t(ns: torch.Tensor, nt: torch.Tensor, sd: dict, p: str, heads: int) -> torch.Tensor:
    b = nt.shape[0]
    t = ns.shape[1] // b
    pat = rearrange(ns[1:], "n b d -> b n d") + sd[f"{p}.clip_space_pos"]
    q_in = rearrange(nt, "b (t n) d -> (b t) n d", t=t) + sd[f"{p}.vmae_space_pos"]
    q = rearrange(F.linear(q_in, sd[f"{p}.s2t_q.weight"], sd[f"{p}.s2t_q_bias"]),
                  "b n (h d) -> b h n d", h=heads)
    kv = rearrange(F.linear(pat, sd[f"{p}.s2t_kv.weight"], sd[f"{p}.s2t_kv_bias"]),
                   "b n (e h d) -> e b h n d", e=2, h=heads)
    out = _lin(rearrange(_attend(q, kv[0], kv[1]), "b h n d -> b n (h d)"), sd, f"{p}.t2s_proj")
    return rearrange(out, "(b t) n d -> b (t n) d", b=b)


def _block(s: torch.Tensor, t: torch.Tensor, sd: dict, p: str,
           heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    h = _ln(s, sd, f"{p}.clip_ln_1", 1e-5)
    a, _ = F.multi_head_attention_forward(
        h, h, h, h.shape[-1], heads, sd[f"{p}.clip_attn.in_proj_weight"],
        sd[f"{p}.clip_attn.in_proj_bias"], None, None, False, 0.0,
        sd[f"{p}.clip_attn.out_proj.weight"], sd[f"{p}.clip_attn.out_proj.bias"], training=False,
        need_weights=False)
    s = s + _adapter(a, sd, f"{p}.S_Adapter", True)
    t = t + _adapter(_vmae_attn(_ln(t, sd, f"{p}.norm1", 1e-6), sd, f"{p}.attn", heads), sd,
                     f"{p}.T_Adapter", True)
    ns = _ln(_lin(s, sd, f"{p}.cross_s_down"), sd, f"{p}.ln_s_cross", 1e-6)
    nt = _ln(_lin(t, sd, f"{p}.cross_t_down"), sd, f"{p}.ln_t_cross", 1e-6)
    s = s + _lin(F.gelu(_t2s(ns, nt, sd, f"{p}.t2s_cross", heads)), sd, f"{p}.cross_s_up")
    t = t + _lin(F.gelu(_s2t(ns, nt, sd, f"{p}.s2t_cross", heads)), sd, f"{p}.cross_t_up")
    h = _ln(s, sd, f"{p}.clip_ln_2", 1e-5)
    mlp = _lin(h, sd, f"{p}.clip_mlp.c_fc")
    s = s + _lin(mlp * torch.sigmoid(1.702 * mlp), sd, f"{p}.clip_mlp.c_proj") + 0.5 * _adapter(
        h, sd, f"{p}.S_MLP_Adapter", False)
    h = _ln(t, sd, f"{p}.norm2", 1e-6)
    t = t + _lin(F.gelu(_lin(h, sd, f"{p}.mlp.fc1")), sd, f"{p}.mlp.fc2") + 0.5 * _adapter(
        h, sd, f"{p}.T_MLP_Adapter", False)
    return s, t


def reference_features(sd: dict[str, torch.Tensor], x: torch.Tensor, *, depth: int, num_heads: int,
                       patch_size: int, tubelet_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled, normalised (spatial, temporal) features of clips ``x [B, 3, T, H, W]``
    (``STCrossTransformer.forward_features``)."""
    b = x.shape[0]
    frames = x[:, :, 1::2] if tubelet_size == 2 else x[:, :, tubelet_size - 1 :: tubelet_size]
    f = rearrange(frames, "b c t h w -> (b t) c h w")
    s = F.conv2d(f, sd["clip_conv1.weight"], stride=patch_size).flatten(2).permute(0, 2, 1)
    cls = sd["clip_class_embedding"] + torch.zeros(s.shape[0], 1, s.shape[-1], dtype=s.dtype)
    s = torch.cat([cls, s], dim=1) + sd["clip_positional_embedding"]
    s = _ln(s, sd, "clip_ln_pre", 1e-5).permute(1, 0, 2)
    t = F.conv3d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                 stride=(tubelet_size, patch_size, patch_size)).flatten(2).transpose(1, 2)
    t = t + sinusoid_table(t.shape[1], t.shape[2]).to(t.dtype)
    for i in range(depth):
        s, t = _block(s, t, sd, f"blocks.{i}", num_heads)
    s = rearrange(s.permute(1, 0, 2), "(b t) n d -> b t n d", b=b)[:, :, 0].mean(1)
    return _ln(s, sd, "clip_ln_post", 1e-5), _ln(t.mean(1), sd, "vmae_fc_norm", 1e-6)


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, *, depth: int, num_heads: int,
                      patch_size: int, tubelet_size: int = 2) -> torch.Tensor:
    """Logits of B-CAST for clips ``x [B, 3, T, H, W]`` with weights ``sd`` (CAST key layout)."""
    s, t = reference_features(sd, x, depth=depth, num_heads=num_heads, patch_size=patch_size,
                              tubelet_size=tubelet_size)
    z = _adapter(s, sd, "noun_last_Adapter", False) + _adapter(t, sd, "verb_last_Adapter", False)
    return _lin(z, sd, "head")


def reference_compo_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, *, depth: int,
                            num_heads: int, patch_size: int,
                            tubelet_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noun logits, verb logits)`` of CAST's ``compo_bidir_vit_base_patch16_224`` (its
    ``forward`` with ``composition=True``, ``bidir_modeling_crossattn.py:549-556``, in eval: the
    head dropouts are identities): the noun head reads the spatial feature, the verb head the
    temporal one, no last adapters."""
    s, t = reference_features(sd, x, depth=depth, num_heads=num_heads, patch_size=patch_size,
                              tubelet_size=tubelet_size)
    return _lin(s, sd, "head_noun"), _lin(t, sd, "head_verb")
