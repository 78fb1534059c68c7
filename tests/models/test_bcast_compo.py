"""Compositional B-CAST: published facts, parity with a restatement of CAST's compo forward on
identical weights, initialisation, and CAST's EK100 checkpoint layouts.

Reference: KHU-VLL/CAST@51eb871 ``models/bidir_modeling_crossattn.py`` (``composition=True``: heads
at L447-451, ``init_scale`` at L464-468, forward at L549-556); counts from
/work/shared/reference/models-cast-tstl.md section 2.2 (compo EPIC: 44,784,781 trainable,
216,808,333 in all).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.reference.bcast import reference_compo_forward, reference_features
from tests.models.test_bcast import _pure_clip, _pure_videomae
from tests.models.test_official_checkpoints import (
    NUMPY,
    _amp_checkpoint,
    _args,
    _deepspeed_model_states,
    _saved,
)
from tstl.models import create_model, load_checkpoint
from tstl.models.bcast_compo import BCASTCompo

TINY = dict(depth=2, num_heads=4, patch_size=8)


def _randomise(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for every tensor, so parity checks every path (zero-initialised ones too)."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(v.shape, generator=g) * 0.05 + (1.0 if k.endswith("weight") and v.ndim == 1
                                                          else 0.0)
          for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    return sd


def test_b16_parameter_counts_and_keys() -> None:
    with torch.device("meta"):
        m = create_model("bcast_compo_vit_b16")
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in m.parameters() if not p.requires_grad)
    assert (trainable, frozen) == (44_784_781, 172_023_552)
    assert m.num_classes == {"verb": 97, "noun": 300} and m.multi_head
    keys = set(m.state_dict())
    # B-CAST's 849 entries without the last adapters (8) and the head (2), with CAST's two heads (4)
    assert len(keys) == 849 - 8 - 2 + 4
    assert {"head_noun.weight", "head_noun.bias", "head_verb.weight", "head_verb.bias"} <= keys
    assert not any("last_Adapter" in k or k.startswith("head.") for k in keys)
    assert m.state_dict()["head_noun.weight"].shape == (300, 768)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_parity_with_casts_compo_forward(dtype: torch.dtype, tol: float) -> None:
    model = create_model("bcast_compo_test").eval()
    sd = _randomise(model)
    model = model.to(dtype)
    x = torch.randn(2, 3, 4, 32, 32, dtype=dtype)
    with torch.no_grad():
        ours = model(x)
        noun, verb = reference_compo_forward({k: v.to(dtype) for k, v in sd.items()}, x, **TINY)
    assert set(ours) == {"verb", "noun"} and ours["noun"].abs().max() > 1e-3
    torch.testing.assert_close(ours["noun"], noun, rtol=tol, atol=tol)
    torch.testing.assert_close(ours["verb"], verb, rtol=tol, atol=tol)


def test_the_heads_read_their_own_stream() -> None:
    """The noun head is a function of the spatial feature only, the verb head of the temporal one.
    """
    model = create_model("bcast_compo_test").eval()
    _randomise(model, 1)
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        s, t = model.forward_features(x)
        out = model.forward_head((s, torch.zeros_like(t)))
        torch.testing.assert_close(out["noun"], model.head_noun(s))
        out = model.forward_head((torch.zeros_like(s), t))
        torch.testing.assert_close(out["verb"], model.head_verb(t))
        ref_s, _ = reference_features(model.state_dict(), x, **TINY)
        torch.testing.assert_close(s, ref_s, rtol=1e-5, atol=1e-5)


def test_init_scale_scales_both_heads_and_the_streams_start_as_the_experts() -> None:
    torch.manual_seed(0)
    one = create_model("bcast_compo_test", init_scale=1.0).eval()
    torch.manual_seed(0)
    small = create_model("bcast_compo_test", init_scale=0.001)
    for h in ("verb", "noun"):
        a, b = getattr(one, f"head_{h}"), getattr(small, f"head_{h}")
        torch.testing.assert_close(b.weight, a.weight * 0.001)
        assert float(a.weight.detach().std()) == pytest.approx(0.02, rel=0.3) and not a.bias.any()
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():  # adapters and up-projections start at zero, as in B-CAST
        s, t = one.forward_features(x)
        sd = one.state_dict()
        torch.testing.assert_close(s, _pure_clip(sd, x, 4, 8), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(t, _pure_videomae(sd, x, 4), rtol=1e-5, atol=1e-5)


def test_a_one_head_value_is_refused_and_reset_classifier_takes_both_heads() -> None:
    with pytest.raises(ValueError, match="several heads"):
        create_model("bcast_compo_test", num_classes=8)
    with pytest.raises(ValueError, match="verb and a noun"):
        BCASTCompo(num_classes={"action": 3}, img_size=32, patch_size=8, embed_dim=64, depth=1,
                   num_heads=4, num_frames=4)
    with pytest.raises(ValueError, match="one head"):
        create_model("bcast_test", num_classes={"verb": 3, "noun": 2})
    model = create_model("bcast_compo_test")
    model.reset_classifier({"verb": 3, "noun": 2})
    out = model(torch.randn(1, 3, 4, 32, 32))
    assert out["verb"].shape == (1, 3) and out["noun"].shape == (1, 2)
    assert model.head_verb.weight.requires_grad


def _compo_weights(seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    src = create_model("bcast_compo_test", num_classes={"verb": 97, "noun": 300})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in src.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return src, src.state_dict()


@NUMPY
@pytest.mark.parametrize("layout", ["amp", "deepspeed", "deepspeed-with-args"])
def test_casts_ek100_checkpoint_loads(tmp_path: Path, layout: str, numpy_names: str) -> None:
    """run_bidirection_compo.py saves epoch "best" as CAST's run_bidirection.py does
    (util_tools/utils.py:658-680 save_model): checkpoint-best.pth with the run's args (torch-amp),
    or checkpoint-best/mp_rank_00_model_states.pt (--enable_deepspeed, scripts/ek100/ek100.sh:45);
    the args are those of ek100.sh (--data_set EPIC --nb_classes 300 --composition); DeepSpeed's
    module is fp16, the pickle names numpy's scalar type (1.x or 2.x names)."""
    src, sd = _compo_weights(3)
    args = _args(data_set="EPIC", nb_classes=300, composition=True,
                 vmae_model="compo_bidir_vit_base_patch16_224", drop_path=0.2)
    if layout == "amp":
        ckpt, name = _amp_checkpoint(sd, src, "best", args), "checkpoint-best.pth"
    else:
        client = {"epoch": "best", **({"args": args} if layout == "deepspeed-with-args" else {})}
        ckpt, name = _deepspeed_model_states(sd, src, client), "mp_rank_00_model_states.pt"
    (tmp_path / "checkpoint-best").mkdir()
    path = _saved(ckpt, tmp_path / "checkpoint-best" / name, numpy_names)
    model = create_model("bcast_compo_test", num_classes={"verb": 97, "noun": 300})
    report = load_checkpoint(model, path)
    assert report.format == "cast" and not report.missing and not report.unexpected
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v if layout == "amp" else v.half().float()), k


def test_a_videomae_classifier_is_dropped_with_its_reason(tmp_path: Path) -> None:
    src = create_model("bcast_test", num_classes=97)
    vmae = {k: v for k, v in src.state_dict().items()
            if k.startswith("patch_embed.") or k.split(".")[2:3] in (["norm1"], ["attn"], ["norm2"],
                                                                     ["mlp"])}
    vmae.update({"head.weight": torch.randn(97, 64), "head.bias": torch.zeros(97)})
    torch.save({"model": vmae}, tmp_path / "vmae.pth")
    model = create_model("bcast_compo_test")
    report = load_checkpoint(model, tmp_path / "vmae.pth")
    assert report.format == "videomae-finetune" and not report.unexplained
    assert "no single head" in report.explained["head.weight"]
