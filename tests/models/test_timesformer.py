"""TimeSformer: parameter counts, initialisation, parity with the reference formulation, checkpoint
loading and the optimizer/training helpers. Everything runs on tiny variants except the parameter
counts (meta device)."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.optim import param_groups_layer_decay

from benchmarks.reference.timesformer import reference_forward
from tstl.models import create_model, load_checkpoint
from tstl.models.timesformer import ATTENTION_TYPES, TimeSformer


def _tiny(attention_type: str = "divided_space_time", **kw) -> TimeSformer:
    return create_model("timesformer_test", attention_type=attention_type, **kw)


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere (zero-initialised temporal_fc/time_embed included, so they are
    exercised)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


# -------------------------------------------------------------------------------------------- facts


@pytest.mark.parametrize("name, kwargs, expected", [
    ("timesformer_vit_b16", dict(attention_type="divided_space_time"), 121_566_352),
    ("timesformer_vit_b16", dict(attention_type="joint_space_time"), 86_112_400),
    ("timesformer_vit_b16", dict(attention_type="space_only"), 86_106_256),
    ("timesformer_hr_vit_b16", {}, 122_024_080),
    ("timesformer_l_vit_b16", {}, 121_633_936),
])
def test_parameter_counts(name: str, kwargs: dict, expected: int) -> None:
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_presets_shapes() -> None:
    with torch.device("meta"):
        hr, large = create_model("timesformer_hr_vit_b16"), create_model("timesformer_l_vit_b16")
    assert hr.pos_embed.shape == (1, 785, 768) and hr.time_embed.shape == (1, 16, 768)
    assert large.pos_embed.shape == (1, 197, 768) and large.time_embed.shape == (1, 96, 768)


def test_init() -> None:
    model = _tiny(embed_dim=128, img_size=64)
    assert torch.count_nonzero(model.time_embed) == 0
    for blk in model.blocks:
        assert (torch.count_nonzero(blk.temporal_fc.weight) == 0
                and torch.count_nonzero(blk.temporal_fc.bias) == 0)
        assert blk.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.pos_embed.abs().max() <= 2.0  # truncated normal, absolute bounds
    assert not hasattr(_tiny("space_only"), "time_embed")


def test_create_model_errors() -> None:
    with pytest.raises(TypeError, match="unknown TimeSformer arguments"):
        create_model("timesformer_test", tubelet_size=2)
    with pytest.raises(ValueError, match="attention_type"):
        create_model("timesformer_test", attention_type="axial")


def test_overrides() -> None:
    model = create_model("timesformer_test", depth=3, num_classes=5, num_frames=6, embed_dim=32,
                         num_heads=2)
    assert len(model.blocks) == 3 and model.time_embed.shape == (1, 6, 32)
    assert model(torch.randn(2, 3, 6, 32, 32)).shape == (2, 5)


# ------------------------------------------------------------------------------------------- parity

# Native size, more frames and pixels than built for (nearest-resized embeddings), fewer, and a
# non-square clip.
_SHAPES = [(2, 4, 32, 32), (2, 6, 48, 40), (1, 3, 24, 32)]


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_parity_with_reference(attention_type: str, dtype: torch.dtype, atol: float) -> None:
    model = _randomize(_tiny(attention_type)).eval().to(dtype)
    sd = model.state_dict()
    torch.manual_seed(1)
    for b, t, h, w in _SHAPES:
        x = torch.randn(b, 3, t, h, w, dtype=dtype)
        with torch.no_grad():
            ours, ref = model(x), reference_forward(sd, x, attention_type, num_heads=4)
            feats = model.forward_features(x)
            ref_feats = reference_forward(sd, x, attention_type, num_heads=4, features=True)
        assert ours.shape == (b, 8) and ours.dtype == dtype
        assert ref.abs().max() > 1e-2  # a real comparison, not zeros against zeros
        torch.testing.assert_close(ours, ref, atol=atol, rtol=0)
        torch.testing.assert_close(feats, ref_feats, atol=atol, rtol=0)


def test_token_order_patch_major_time_minor() -> None:
    """Changing frame t, patch (h, w) of the input changes exactly token 1 + (h*W' + w)*T + t."""
    model = _randomize(_tiny()).eval()
    x = torch.randn(1, 3, 4, 32, 32)
    t, h, w = 2, 1, 3
    y = x.clone()
    y[0, :, t, h * 8:(h + 1) * 8, w * 8:(w + 1) * 8] += 1.0
    with torch.no_grad():
        changed = ((model._embed(x)[0] - model._embed(y)[0]).abs().sum(-1)[0]
                   .nonzero().flatten().tolist())
    assert changed == [1 + (h * 4 + w) * 4 + t]


def test_forward_time_and_position_resize_rules() -> None:
    """T=8 on a 4-frame model uses time_embed[t // 2]; 64 px on a 32 px model uses pos
    (r//2, c//2)."""
    model = _randomize(_tiny()).eval()
    sd = model.state_dict()
    stretched = TimeSformer(**{**_tiny_args(), "num_frames": 8, "img_size": 64}).eval()
    sd8 = dict(sd)
    sd8["time_embed"] = sd["time_embed"][:, torch.arange(8) // 2]
    grid = sd["pos_embed"][0, 1:].view(4, 4, -1)
    idx = torch.arange(8) // 2
    sd8["pos_embed"] = torch.cat((sd["pos_embed"][:, :1], grid[idx][:, idx].reshape(1, 64, -1)),
                                 dim=1)
    stretched.load_state_dict(sd8)
    x = torch.randn(1, 3, 8, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), stretched(x), atol=1e-6, rtol=0)


def _tiny_args() -> dict:
    return dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_frames=4,
                num_classes=8)


# -------------------------------------------------------------------------------------- checkpoints


def test_official_pyth_loads_strict(tmp_path) -> None:
    src = _randomize(_tiny()).eval()
    path = tmp_path / "TimeSformer_divST_test.pyth"
    torch.save({"model_state": {f"model.{k}": v for k, v in src.state_dict().items()}, "epoch": 15,
                "cfg": "TRAIN: {}"}, path)
    model = _tiny()
    report = load_checkpoint(model, path)
    assert report.format == "timesformer" and report.missing == [] and report.unexpected == []
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), src(x), atol=0, rtol=0)


@pytest.mark.parametrize("src_frames, dst_frames, index",
                         [(8, 4, [0, 2, 4, 6]), (4, 8, [0, 0, 1, 1, 2, 2, 3, 3])])
def test_pyth_time_embed_resized(tmp_path, src_frames: int, dst_frames: int,
                                 index: list[int]) -> None:
    src = _randomize(_tiny(num_frames=src_frames))
    path = tmp_path / "ck.pyth"
    torch.save({"model_state": {f"model.{k}": v for k, v in src.state_dict().items()}, "epoch": 1},
               path)
    model = _tiny(num_frames=dst_frames)
    load_checkpoint(model, path)
    torch.testing.assert_close(model.time_embed, src.time_embed[:, index], atol=0, rtol=0)
    torch.testing.assert_close(model.blocks[1].temporal_fc.weight, src.blocks[1].temporal_fc.weight)


def _timm_vit_tiny(tmp_path, img_size: int = 32):
    """A random-weight timm ``vit_tiny``-style state dict (ImageNet layout: 1000 classes, no
    temporal keys)."""
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, depth=2)
    sd = {k: torch.randn_like(v) for k, v in vit.state_dict().items()}
    path = tmp_path / "vit_tiny.pth"
    torch.save(sd, path)
    return sd, path


def _tsf_for_vit_tiny(**kw) -> TimeSformer:
    return create_model("timesformer_test", img_size=32, patch_size=16, embed_dim=192, depth=2,
                        num_heads=3, **kw)


def test_timm_vit_init_divided(tmp_path) -> None:
    sd, path = _timm_vit_tiny(tmp_path)
    model = _tsf_for_vit_tiny()
    report = load_checkpoint(model, path)
    assert report.format == "timm-vit" and report.unexplained == []
    assert {"head.weight", "head.bias"} <= set(report.unexpected) and "time_embed" in report.missing
    for i, blk in enumerate(model.blocks):
        torch.testing.assert_close(blk.temporal_attn.qkv.weight, sd[f"blocks.{i}.attn.qkv.weight"],
                                   atol=0, rtol=0)
        torch.testing.assert_close(blk.temporal_attn.proj.bias, sd[f"blocks.{i}.attn.proj.bias"],
                                   atol=0, rtol=0)
        torch.testing.assert_close(blk.temporal_norm1.weight, sd[f"blocks.{i}.norm1.weight"],
                                   atol=0, rtol=0)
        torch.testing.assert_close(blk.attn.qkv.weight, sd[f"blocks.{i}.attn.qkv.weight"],
                                   atol=0, rtol=0)
        assert torch.count_nonzero(blk.temporal_fc.weight) == 0
    assert torch.count_nonzero(model.time_embed) == 0
    assert model.head.weight.shape == (8, 192)


def test_timm_vit_init_is_a_per_frame_vit(tmp_path) -> None:
    """Loaded from a ViT (zero temporal_fc and time_embed), divided and space-only models on a
    one-frame clip give exactly the ViT's features."""
    sd, path = _timm_vit_tiny(tmp_path)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2,
                            num_classes=0).eval()
    vit.load_state_dict({k: v for k, v in sd.items() if not k.startswith("head")})
    x = torch.randn(2, 3, 1, 32, 32)
    with torch.no_grad():
        expected = vit.forward_head(vit.forward_features(x[:, :, 0]), pre_logits=True)
        for attention_type in ("divided_space_time", "space_only"):
            model = _tsf_for_vit_tiny(attention_type=attention_type, num_frames=1).eval()
            load_checkpoint(model, path)
            torch.testing.assert_close(model.forward_features(x), expected, atol=1e-5, rtol=1e-5)


def test_timm_vit_pos_embed_flat_resize(tmp_path) -> None:
    """ImageNet 2x2 patches -> 4x4: the reference loader's 1-D nearest over the flat sequence
    (new i <- old i//4)."""
    sd, path = _timm_vit_tiny(tmp_path)
    model = create_model("timesformer_test", img_size=64, patch_size=16, embed_dim=192, depth=2,
                         num_heads=3)
    load_checkpoint(model, path)
    old = sd["pos_embed"]
    torch.testing.assert_close(model.pos_embed[:, 0], old[:, 0], atol=0, rtol=0)
    torch.testing.assert_close(model.pos_embed[:, 1:], old[:, 1 + torch.arange(16) // 4],
                               atol=0, rtol=0)
    grid = create_model("timesformer_test", img_size=64, patch_size=16, embed_dim=192, depth=2,
                        num_heads=3, checkpoint_pos_resize="grid")
    load_checkpoint(grid, path)
    rows = torch.arange(4) // 2
    expected = old[0, 1:].view(2, 2, -1)[rows][:, rows].reshape(16, -1)
    torch.testing.assert_close(grid.pos_embed[0, 1:], expected, atol=0, rtol=0)


def test_divided_checkpoint_into_joint_and_space_only(tmp_path) -> None:
    src = _randomize(_tiny())
    path = tmp_path / "div.pth"
    torch.save({"module": src.state_dict()}, path)
    joint = _tiny("joint_space_time")
    report = load_checkpoint(joint, path)
    assert report.unexplained == [] and any(".temporal_fc." in k for k in report.unexpected)
    torch.testing.assert_close(joint.time_embed, src.time_embed)
    space = _tiny("space_only")
    assert "time_embed" in load_checkpoint(space, path).unexpected


def test_unexplained_keys_fail(tmp_path) -> None:
    sd = _tiny().state_dict()
    sd["blocks.0.attn.q_bias"] = torch.zeros(64)
    path = tmp_path / "odd.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match="q_bias"):
        load_checkpoint(_tiny(), path)
    assert "blocks.0.attn.q_bias" in load_checkpoint(_tiny(), path, strict=False).unexplained


def test_in21k_pre_logits_dropped() -> None:
    sd = dict(_tiny("space_only").state_dict().items())
    sd["pre_logits.fc.weight"] = torch.zeros(64, 64)
    conv = _tiny().convert_checkpoint(sd)
    assert ("pre_logits.fc.weight" in conv.explained_unexpected
            and "pre_logits.fc.weight" not in conv.state_dict)


def test_flattened_patch_projection(tmp_path) -> None:
    src = _randomize(_tiny())
    sd = src.state_dict()
    sd["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"].flatten(1)
    model = _tiny()
    conv = model.convert_checkpoint(sd)
    torch.testing.assert_close(conv.state_dict["patch_embed.proj.weight"],
                               src.patch_embed.proj.weight)


# ----------------------------------------------------------------------------------------- training


def test_grad_checkpointing_same_gradients() -> None:
    torch.manual_seed(0)
    model = _randomize(_tiny()).train()
    # drop path draws would differ between the two runs
    model.blocks[0].drop_path = torch.nn.Identity()
    model.blocks[1].drop_path = torch.nn.Identity()
    x = torch.randn(2, 3, 4, 32, 32)
    model(x).square().sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], atol=1e-6, rtol=1e-5)
    assert plain["blocks.0.temporal_fc.weight"].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype: torch.dtype) -> None:
    model = _randomize(_tiny()).eval()
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out = model.to(dtype)(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.1)


def test_optimizer_helpers() -> None:
    model = _tiny(depth=3)
    assert model.no_weight_decay() == {"cls_token", "pos_embed", "time_embed"}
    assert _tiny("space_only").no_weight_decay() == {"cls_token", "pos_embed"}
    groups = param_groups_layer_decay(model, weight_decay=0.05,
                                      no_weight_decay_list=model.no_weight_decay(), layer_decay=0.5)
    name_of = {id(p): n for n, p in model.named_parameters()}
    by_name = {name_of[id(p)]: g for g in groups for p in g["params"]}
    assert set(by_name) == {n for n, _ in model.named_parameters()}
    assert (by_name["time_embed"]["weight_decay"] == 0
            and by_name["blocks.0.attn.qkv.bias"]["weight_decay"] == 0)
    assert by_name["blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    scale = {n: g["lr_scale"] for n, g in by_name.items()}
    # CAST's rule (get_num_layer_for_vit): embeddings (0), blocks 1-3, the final norm and the head
    # last (timm's ViT would merge the norm into the last block; issue 24: no such merge declared).
    assert (scale["pos_embed"] == pytest.approx(0.5 ** 4)
            and scale["patch_embed.proj.weight"] == scale["pos_embed"])
    assert scale["blocks.0.temporal_fc.weight"] == pytest.approx(0.5 ** 3)
    assert scale["blocks.2.mlp.fc1.weight"] == pytest.approx(0.5)
    assert scale["norm.weight"] == 1.0 and scale["head.weight"] == 1.0


def test_reset_classifier() -> None:
    model = _tiny()
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 4, 32, 32)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 4, 32, 32)).shape == (1, 64)
