"""B-CAST: published facts (parameters, compute, init), parity with the reference formulation,
training helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from benchmarks.reference.bcast import reference_forward
from tstl.models import create_model
from tstl.models.bcast import BCAST
from tstl.models.flops import flops_per_view

TINY = dict(depth=2, num_heads=4, patch_size=8)


def _randomise(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for every tensor (zero-initialised adapters too), so parity checks every
    path."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(v.shape, generator=g) * 0.05
          + (1.0 if k.endswith("weight") and v.ndim == 1 else 0.0)
          for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    return sd


def test_b16_parameter_counts() -> None:
    with torch.device("meta"):
        for classes in (174, 400):
            m = create_model("bcast_vit_b16", num_classes=classes)
            trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
            frozen = sum(p.numel() for p in m.parameters() if not p.requires_grad)
            assert trainable == 45_071_232 + 769 * classes
            assert frozen == 172_023_552
    assert len(m.state_dict()) == 849  # the reference's entries, no buffers saved


def test_b16_compute_per_view() -> None:
    with torch.device("meta"):
        macs = flops_per_view(create_model("bcast_vit_b16", num_classes=400))
    # torch's FlopCounterMode does not see the fused nn.MultiheadAttention kernel that the
    # reference's CLIP attention runs in eval mode, so the published 384.8 G leaves out CLIP's
    # attention-score matmuls: 12 blocks x 8 frames x 12 heads x (197 x 197 x 64) x 2 (QK^T and AV).
    clip_scores = 12 * 8 * 12 * 197 * 197 * 64 * 2
    assert (macs - clip_scores) / 1e9 == pytest.approx(384.8, abs=0.05)
    assert macs / 1e9 == pytest.approx(390.5, abs=0.05)


def _pure_clip(sd: dict, x: torch.Tensor, heads: int, patch: int) -> torch.Tensor:
    f = rearrange(x[:, :, 1::2], "b c t h w -> (b t) c h w")
    s = F.conv2d(f, sd["clip_conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    s = (torch.cat([sd["clip_class_embedding"].expand(s.shape[0], 1, -1), s], 1)
         + sd["clip_positional_embedding"])
    s = F.layer_norm(s, s.shape[-1:], sd["clip_ln_pre.weight"], sd["clip_ln_pre.bias"], 1e-5)
    mha = torch.nn.MultiheadAttention(s.shape[-1], heads, batch_first=True)
    i = 0
    while f"blocks.{i}.clip_ln_1.weight" in sd:
        p = f"blocks.{i}."
        mha.load_state_dict({k.removeprefix(p + "clip_attn."): v for k, v in sd.items()
                             if k.startswith(p + "clip_attn.")})
        h = F.layer_norm(s, s.shape[-1:], sd[p + "clip_ln_1.weight"], sd[p + "clip_ln_1.bias"],
                         1e-5)
        s = s + mha(h, h, h, need_weights=False)[0]
        h = F.layer_norm(s, s.shape[-1:], sd[p + "clip_ln_2.weight"], sd[p + "clip_ln_2.bias"],
                         1e-5)
        h = F.linear(h, sd[p + "clip_mlp.c_fc.weight"], sd[p + "clip_mlp.c_fc.bias"])
        s = s + F.linear(h * torch.sigmoid(1.702 * h), sd[p + "clip_mlp.c_proj.weight"],
                         sd[p + "clip_mlp.c_proj.bias"])
        i += 1
    cls = rearrange(s[:, 0], "(b t) d -> b t d", b=x.shape[0]).mean(1)
    return F.layer_norm(cls, cls.shape[-1:], sd["clip_ln_post.weight"], sd["clip_ln_post.bias"],
                        1e-5)


def _pure_videomae(sd: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    from tstl.models.bcast import sinusoid_table

    w = sd["patch_embed.proj.weight"]
    t = F.conv3d(x, w, sd["patch_embed.proj.bias"], stride=w.shape[2:]).flatten(2).transpose(1, 2)
    t = t + sinusoid_table(t.shape[1], t.shape[2])
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        p = f"blocks.{i}."
        h = F.layer_norm(t, t.shape[-1:], sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        bias = torch.cat([sd[p + "attn.q_bias"], torch.zeros_like(sd[p + "attn.q_bias"]),
                          sd[p + "attn.v_bias"]])
        q, k, v = rearrange(F.linear(h, sd[p + "attn.qkv.weight"], bias),
                            "b n (e h d) -> e b h n d", e=3, h=heads)
        a = rearrange(torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1) @ v,
                      "b h n d -> b n (h d)")
        t = t + F.linear(a, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(t, t.shape[-1:], sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        t = t + F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                         sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        i += 1
    m = t.mean(1)
    return F.layer_norm(m, m.shape[-1:], sd["vmae_fc_norm.weight"], sd["vmae_fc_norm.bias"], 1e-6)


def test_at_init_streams_are_the_pure_experts_and_logits_are_zero() -> None:
    torch.manual_seed(0)
    model = create_model("bcast_test", num_classes=5).eval()
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        s, t = model.forward_features(x)
        sd = model.state_dict()
        torch.testing.assert_close(s, _pure_clip(sd, x, 4, 8), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(t, _pure_videomae(sd, x, 4), rtol=1e-5, atol=1e-5)
        assert torch.equal(model(x), torch.zeros(2, 5))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_parity_with_the_reference_formulation(dtype: torch.dtype, tol: float) -> None:
    model = create_model("bcast_test", num_classes=5).eval()
    sd = _randomise(model)
    model = model.to(dtype)
    x = torch.randn(2, 3, 4, 32, 32, dtype=dtype)
    with torch.no_grad():
        ours = model(x)
        ref = reference_forward({k: v.to(dtype) for k, v in sd.items()}, x, **TINY)
    assert ours.abs().max() > 1e-3  # a non-trivial output
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


def test_backward_reaches_only_trainable_parameters_and_bf16_runs() -> None:
    model = create_model("bcast_test", num_classes=5, drop_path_rate=0.1)
    _randomise(model)
    model(torch.randn(2, 3, 4, 32, 32)).square().sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "blocks.0.clip_attn.in_proj_weight" in frozen and "patch_embed.proj.weight" in frozen
    assert "blocks.1.s2t_cross.clip_space_pos" not in frozen and "clip_ln_post.weight" not in frozen
    out = model.to(torch.bfloat16)(torch.randn(2, 3, 4, 32, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    model = create_model("bcast_test", num_classes=5)
    _randomise(model)
    x = torch.randn(2, 3, 4, 32, 32)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        model(x).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6)


def test_layer_decay_groups_and_no_weight_decay() -> None:
    from timm.optim import param_groups_layer_decay

    model = create_model("bcast_test", num_classes=5)
    nwd = model.no_weight_decay()
    assert "blocks.0.t2s_cross.clip_time_pos" in nwd and "blocks.1.s2t_cross.vmae_space_pos" in nwd
    groups = param_groups_layer_decay(model, weight_decay=0.05, no_weight_decay_list=list(nwd),
                                      layer_decay=0.75)
    by_id = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    depth = len(model.blocks)
    assert (by_id[id(named["blocks.0.cross_s_down.weight"])]["lr_scale"]
            == pytest.approx(0.75 ** depth))
    assert (by_id[id(named["blocks.1.cross_s_down.weight"])]["lr_scale"]
            == pytest.approx(0.75 ** (depth - 1)))
    assert by_id[id(named["head.weight"])]["lr_scale"] == pytest.approx(1.0)
    assert by_id[id(named["head.weight"])]["weight_decay"] == 0.05
    assert by_id[id(named["head.bias"])]["weight_decay"] == 0.0
    assert by_id[id(named["blocks.0.t2s_cross.clip_time_pos"])]["weight_decay"] == 0.0


def test_rejects_clips_of_the_wrong_size() -> None:
    model = create_model("bcast_test")
    with pytest.raises(ValueError, match="expects"):
        model(torch.randn(1, 3, 8, 32, 32))


def test_registry_overrides() -> None:
    m = create_model("bcast_test", num_classes=3, depth=1, down_ratio=4, adapter_ratio=0.5)
    assert isinstance(m, BCAST) and len(m.blocks) == 1 and m.head.out_features == 3
    assert (m.blocks[0].cross_s_down.out_features == 16
            and m.blocks[0].S_Adapter.D_fc1.out_features == 32)
    with pytest.raises(TypeError, match="unknown B-CAST arguments"):
        create_model("bcast_test", depht=3)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("bcast_huge")
