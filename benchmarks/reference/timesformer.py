"""A literal, functional restatement of the reference TimeSformer forward
(facebookresearch/TimeSformer ``vit.py``), for parity tests and benchmarks.

It follows the reference step by step: every frame gets its own cls token before the position
embedding and the first B rows' cls are kept; tokens are regrouped with einops (one copy per
regrouping); attention is ``softmax(q @ k^T * scale) @ v`` computed explicitly; the final norm runs
over every token before the cls is taken. It reads weights from a state dict in the model's (= the
reference's) key layout, so ``reference_forward(model.state_dict(), x, ...)`` must equal
``model(x)`` in eval mode. Written from the reference's semantics (see docs/models.md), not copied
from it. No dropout or drop path: inference only, plus gradients for the benchmark.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

EPS = 1e-6


def _ln(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], EPS)


def _lin(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def _attn(x: torch.Tensor, sd: dict, name: str, heads: int) -> torch.Tensor:
    _b, _n, c = x.shape
    qkv = rearrange(_lin(x, sd, f"{name}.qkv"), "b n (three h d) -> three b h n d", three=3,
                    h=heads)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
    return _lin(rearrange(attn @ v, "b h n d -> b n (h d)"), sd, f"{name}.proj")


def _mlp(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return _lin(F.gelu(_lin(x, sd, f"{name}.fc1")), sd, f"{name}.fc2")


def _divided_block(x: torch.Tensor, sd: dict, p: str, heads: int, b: int, t: int,
                   w: int) -> torch.Tensor:
    h = (x.size(1) - 1) // t // w
    xt = rearrange(x[:, 1:], "b (h w t) m -> (b h w) t m", b=b, h=h, w=w, t=t)
    res_t = _attn(_ln(xt, sd, f"{p}.temporal_norm1"), sd, f"{p}.temporal_attn", heads)
    res_t = _lin(rearrange(res_t, "(b h w) t m -> b (h w t) m", b=b, h=h, w=w, t=t), sd,
                 f"{p}.temporal_fc")
    xt = x[:, 1:] + res_t
    init_cls = x[:, 0].unsqueeze(1)
    cls = rearrange(init_cls.repeat(1, t, 1), "b t m -> (b t) m").unsqueeze(1)
    xs = torch.cat((cls, rearrange(xt, "b (h w t) m -> (b t) (h w) m", b=b, h=h, w=w, t=t)), dim=1)
    res_s = _attn(_ln(xs, sd, f"{p}.norm1"), sd, f"{p}.attn", heads)
    cls_res = rearrange(res_s[:, 0], "(b t) m -> b t m", b=b, t=t).mean(dim=1, keepdim=True)
    patch_res = rearrange(res_s[:, 1:], "(b t) (h w) m -> b (h w t) m", b=b, h=h, w=w, t=t)
    x = torch.cat((init_cls, xt), dim=1) + torch.cat((cls_res, patch_res), dim=1)
    return x + _mlp(_ln(x, sd, f"{p}.norm2"), sd, f"{p}.mlp")


def _plain_block(x: torch.Tensor, sd: dict, p: str, heads: int) -> torch.Tensor:
    x = x + _attn(_ln(x, sd, f"{p}.norm1"), sd, f"{p}.attn", heads)
    return x + _mlp(_ln(x, sd, f"{p}.norm2"), sd, f"{p}.mlp")


def _embed(x: torch.Tensor, sd: dict, attention_type: str) -> tuple[torch.Tensor, int, int]:
    b, _, t, _, _ = x.shape
    weight = sd["patch_embed.proj.weight"]
    x = F.conv2d(rearrange(x, "b c t h w -> (b t) c h w"), weight, sd["patch_embed.proj.bias"],
                 stride=weight.shape[-1])
    w = x.size(-1)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat((sd["cls_token"].expand(x.size(0), -1, -1), x), dim=1)
    pos = sd["pos_embed"]
    if x.size(1) != pos.size(1):
        p = int((pos.size(1) - 1) ** 0.5)
        grid = rearrange(pos[:, 1:], "1 (p q) d -> 1 d p q", p=p, q=p)
        grid = F.interpolate(grid, size=(x.size(1) // w, w), mode="nearest")
        pos = torch.cat((pos[:, :1], rearrange(grid, "1 d h w -> 1 (h w) d")), dim=1)
    x = x + pos
    if attention_type != "space_only":
        cls = x[:b, 0].unsqueeze(1)
        x = rearrange(x[:, 1:], "(b t) n m -> (b n) t m", b=b, t=t)
        time = sd["time_embed"]
        if time.size(1) != t:
            time = F.interpolate(time.transpose(1, 2), size=t, mode="nearest").transpose(1, 2)
        x = rearrange(x + time, "(b n) t m -> b (n t) m", b=b, t=t)
        x = torch.cat((cls, x), dim=1)
    return x, t, w


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, attention_type: str,
                      num_heads: int, features: bool = False) -> torch.Tensor:
    """Logits (or, with ``features``, the final-normed cls token) of the reference forward on
    ``x [B,3,T,H,W]``."""
    b = x.shape[0]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    x, t, w = _embed(x, sd, attention_type)
    for i in range(depth):
        if attention_type == "divided_space_time":
            x = _divided_block(x, sd, f"blocks.{i}", num_heads, b, t, w)
        else:
            x = _plain_block(x, sd, f"blocks.{i}", num_heads)
    if attention_type == "space_only":
        x = rearrange(x, "(b t) n m -> b t n m", b=b, t=t).mean(dim=1)
    x = _ln(x, sd, "norm")[:, 0]
    return x if features or "head.weight" not in sd else _lin(x, sd, "head")
