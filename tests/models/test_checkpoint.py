"""Loading every checkpoint layout B-CAST meets, made here with random weights in the official key
layouts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from tstl.models import create_model, load_checkpoint
from tstl.models.checkpoint import Conversion, read_checkpoint


def _model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("bcast_test", num_classes=5)


def _reference_weights(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in _model().state_dict().items()}


def _clip_layout(sd: dict) -> dict[str, torch.Tensor]:
    """Our CLIP expert weights under OpenAI's full-model names (visual.*), plus text-tower keys."""
    out = {"visual.proj": torch.randn(64, 32), "token_embedding.weight": torch.randn(10, 32),
           # text tower: same names as visual
           "transformer.resblocks.0.attn.in_proj_weight": torch.randn(96, 32)}
    for k, v in sd.items():
        if m := re.match(r"blocks\.(\d+)\.clip_(.*)", k):
            out[f"visual.transformer.resblocks.{m[1]}.{m[2]}"] = v
        elif k.startswith("clip_"):
            out["visual." + k.removeprefix("clip_")] = v
    return out


def _videomae_layout(sd: dict, pretrain: bool, classes: int) -> dict[str, torch.Tensor]:
    keys = [k for k in sd if re.match(r"^(patch_embed\.|blocks\.\d+\.(norm1|attn|norm2|mlp)\.)", k)]
    if pretrain:
        out = {f"encoder.{k}": sd[k] for k in keys}
        out.update({"encoder.norm.weight": torch.ones(64), "encoder.norm.bias": torch.zeros(64),
                    "decoder.blocks.0.mlp.fc1.weight": torch.randn(8, 8),
                    "encoder_to_decoder.weight": torch.randn(8, 64),
                    "mask_token": torch.zeros(1, 1, 8)})
        return {"model": out}
    out = {k: sd[k] for k in keys}
    out.update({"fc_norm.weight": torch.full((64,), 2.0), "fc_norm.bias": torch.zeros(64),
                "head.weight": torch.randn(classes, 64), "head.bias": torch.randn(classes)})
    return {"module": out}


def _scripted(weights: dict, path: Path) -> None:
    # TorchScript keeps submodule structure, so build nested modules whose state_dict() has the
    # dotted names.
    root = nn.Module()
    for k, v in weights.items():
        *mods, leaf = k.split(".")
        node = root
        for m in mods:
            if not hasattr(node, m):
                node.add_module(m, nn.Module())
            node = getattr(node, m)
        node.register_parameter(leaf, nn.Parameter(v.half()))

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name, child in root.named_children():
                self.add_module(name, child)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    torch.jit.save(torch.jit.script(Wrapper()), str(path))


def test_openai_clip_torchscript_archive(tmp_path: Path) -> None:
    ref = _reference_weights()
    weights = _clip_layout(ref)
    path = tmp_path / "ViT-B-16.pt"
    _scripted(weights, path)
    model = _model()
    report = load_checkpoint(model, path)
    assert report.format == "openai-clip" and not report.unexplained
    sd = model.state_dict()
    assert torch.equal(sd["blocks.1.clip_attn.in_proj_weight"],
                       ref["blocks.1.clip_attn.in_proj_weight"].half().float())
    assert torch.equal(sd["clip_ln_post.weight"], ref["clip_ln_post.weight"].half().float())
    assert "visual.proj" in report.unexpected or "proj" in report.unexpected
    # other expert untouched
    assert not torch.equal(sd["patch_embed.proj.weight"], ref["patch_embed.proj.weight"])


def test_plain_clip_state_dict_and_a_missing_key_fails(tmp_path: Path) -> None:
    ref = _reference_weights()
    weights = _clip_layout(ref)
    torch.save(weights, tmp_path / "clip.pt")
    assert load_checkpoint(_model(), tmp_path / "clip.pt").format == "openai-clip"
    del weights["visual.transformer.resblocks.1.ln_2.weight"]
    torch.save(weights, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="blocks.1.clip_ln_2.weight"):
        load_checkpoint(_model(), tmp_path / "broken.pt")
    report = load_checkpoint(_model(), tmp_path / "broken.pt", strict=False)
    assert report.unexplained == ["blocks.1.clip_ln_2.weight"]


@pytest.mark.parametrize("pretrain,classes", [(True, 5), (False, 5), (False, 174)])
def test_videomae_pretrained_and_finetuned(tmp_path: Path, pretrain: bool, classes: int) -> None:
    ref = _reference_weights()
    ckpt = _videomae_layout(ref, pretrain, classes)
    torch.save(ckpt, tmp_path / "vmae.pth")
    model = _model()
    report = load_checkpoint(model, tmp_path / "vmae.pth")
    assert (report.format == ("videomae-pretrain" if pretrain else "videomae-finetune")
            and not report.unexplained)
    sd = model.state_dict()
    assert torch.equal(sd["blocks.0.attn.q_bias"], ref["blocks.0.attn.q_bias"])
    assert torch.equal(sd["patch_embed.proj.weight"], ref["patch_embed.proj.weight"])
    head_loaded = not pretrain and classes == 5
    if not pretrain:
        assert torch.equal(sd["head.weight"], ckpt["module"]["head.weight"]) == head_loaded
    # VideoMAE's fc_norm is not loaded (as CAST)
    assert torch.equal(sd["vmae_fc_norm.weight"], torch.ones(64))


def test_cast_and_deepspeed_checkpoints_round_trip(tmp_path: Path) -> None:
    src = _model()
    src.load_state_dict(_reference_weights())
    torch.save({"model": src.state_dict(), "epoch": 3}, tmp_path / "cast.pth")
    torch.save({"module": {f"module.{k}": v for k, v in src.state_dict().items()},
                "dp_world_size": 1}, tmp_path / "mp_rank_00_model_states.pt")
    x = torch.randn(1, 3, 4, 32, 32)
    for name in ("cast.pth", "mp_rank_00_model_states.pt"):
        model = _model()
        report = load_checkpoint(model, tmp_path / name)
        assert report.format == "cast" and not report.missing and not report.unexpected
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), src.eval()(x), rtol=0, atol=0)


def test_a_cast_checkpoint_of_other_classes_starts_a_new_head_only_when_asked(
        tmp_path: Path) -> None:
    src = _model()
    src.load_state_dict(_reference_weights())
    torch.save({"model": src.state_dict()}, tmp_path / "cast.pth")
    selector = create_model("bcast_test", num_classes=3)  # e.g. a TSTL selector over 3 groups
    with pytest.raises(ValueError, match="shape mismatch"):
        load_checkpoint(selector, tmp_path / "cast.pth")
    head = selector.head.weight.detach().clone()
    report = load_checkpoint(selector, tmp_path / "cast.pth", reinit_mismatched=("head.",))
    assert sorted(report.missing) == ["head.bias", "head.weight"] and not report.unexplained
    assert torch.equal(selector.head.weight, head)  # kept at its initialisation
    assert torch.equal(selector.state_dict()["blocks.0.clip_attn.in_proj_weight"],
                       src.state_dict()["blocks.0.clip_attn.in_proj_weight"])


def test_adapters_edit_the_conversion_before_loading(tmp_path: Path) -> None:
    src = _model()
    src.load_state_dict(_reference_weights())
    torch.save({"model": src.state_dict()}, tmp_path / "cast.pth")
    seen = []

    def first_rows(conv: Conversion, own: dict[str, torch.Tensor]) -> None:
        """A trivial adapter: the checkpoint head's first rows, as many as the model has classes."""
        seen.append((conv.format, tuple(own["head.weight"].shape)))
        for k in ("head.weight", "head.bias"):
            conv.state_dict[k] = conv.state_dict[k][: own[k].shape[0]]
        conv.explained_unexpected["adapter.note"] = "checked by the test"

    def noop(conv: Conversion, own: dict[str, torch.Tensor]) -> None:
        seen.append("second")

    model = create_model("bcast_test", num_classes=2)
    report = load_checkpoint(model, tmp_path / "cast.pth", adapters=[first_rows, noop])
    assert seen == [("cast", (2, 64)), "second"]  # called in order, with the model's own state dict
    assert (torch.equal(model.head.weight, src.head.weight[:2])
            and torch.equal(model.head.bias, src.head.bias[:2]))
    assert report.explained["adapter.note"] == "checked by the test" and not report.unexplained


def test_experts_then_cast_fill_the_whole_model(tmp_path: Path) -> None:
    ref = _reference_weights()
    _scripted(_clip_layout(ref), tmp_path / "clip.pt")
    torch.save(_videomae_layout(ref, False, 5), tmp_path / "vmae.pth")
    model = _model()
    load_checkpoint(model, tmp_path / "clip.pt")
    load_checkpoint(model, tmp_path / "vmae.pth")
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    sd = model.state_dict()
    for n in frozen:
        assert torch.equal(sd[n], ref[n].half().float() if "clip" in n else ref[n]), n


def test_unreadable_and_unknown_files(tmp_path: Path) -> None:
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="x.pt"):
        read_checkpoint(tmp_path / "x.pt")
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "y.pt")
    with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
        load_checkpoint(_model(), tmp_path / "y.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(_model(), tmp_path / "missing.pt")
