"""Hugging Face checkpoints load and match ``transformers``' own forward on the same clip.

Each test builds a tiny model with ``transformers`` (random weights, every tensor randomised so no
bias hides at zero), writes it with ``save_pretrained`` (safetensors; ``pytorch_model.bin`` as
transformers 4 wrote it; a hub-cache ``models--org--name/snapshots/<hash>`` tree with blobs and
``refs/main``), loads it into our tiny variant with the same shapes and compares with transformers
in float32 (<= 1e-4). The key maps are in ``tstl/models/timesformer.py`` (``_HF_TOP``/``_HF_BLOCK``,
from transformers' ``convert_timesformer_to_pytorch.py``) and ``tstl/models/bcast.py``
(``_HF_VMAE_*``, from ``convert_videomae_to_pytorch.py``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tstl.models import UntrustedCheckpointError, create_model, load_checkpoint
from tstl.models.checkpoint import check_checkpoint, hf_folder
from tstl.models.layouts import UnsupportedLayoutError
from tstl.models.timesformer import hf_state_dict, save_hf

transformers = pytest.importorskip("transformers", reason="test dependency: pip install -e .[dev]")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOL = dict(rtol=0, atol=1e-4)
# timesformer_test / bcast_test: 32 px, patch 8, 4 frames, width 64, depth 2, 4 heads, MLP 256
TINY = dict(image_size=32, patch_size=8, num_frames=4, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=256)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "layernorm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))


def _clip(frames: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, frames, 32, 32, generator=torch.Generator().manual_seed(seed))


def _hf_timesformer(tmp_path: Path, attention_type: str = "divided_space_time", **cfg):
    config = transformers.TimesformerConfig(**{**TINY, **cfg}, num_labels=8, layer_norm_eps=1e-6,
                                            attention_type=attention_type)
    hf = transformers.TimesformerForVideoClassification(config).eval()
    _randomise(hf, 1)
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


def _hf_videomae(tmp_path: Path, cls: str = "VideoMAEForVideoClassification", **cfg):
    config = transformers.VideoMAEConfig(**{**TINY, **cfg}, tubelet_size=2, num_labels=5,
                                         layer_norm_eps=1e-6)
    hf = getattr(transformers, cls)(config).eval()
    _randomise(hf, 2)
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


def _as_bin(folder: Path) -> Path:
    """The folder as transformers 4 wrote it with safe_serialization=False: pytorch_model.bin, a
    torch.save of the state dict under the same names."""
    sd = safetensors_torch.load_file(str(folder / "model.safetensors"))
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def _as_hub_cache(folder: Path, root: Path, repo: str) -> tuple[Path, Path]:
    """huggingface_hub's cache layout: blobs by hash, snapshots/<commit> of symlinks, refs/main
    naming the commit. Returns (the repository folder, its snapshot folder)."""
    cache = root / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "snapshots" / commit
    (cache / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(commit)
    for f in folder.iterdir():
        blob = cache / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return cache, snap


# ------------------------------------------------------------------------------------- TimeSformer


@pytest.mark.parametrize("attention_type", ["divided_space_time", "joint_space_time"])
def test_timesformer_logits_match_transformers(tmp_path: Path, attention_type: str) -> None:
    hf, folder = _hf_timesformer(tmp_path, attention_type)
    model = create_model("timesformer_test", attention_type=attention_type).eval()
    report = load_checkpoint(model, folder)
    assert report.format == "hf-timesformer" and not report.missing and not report.unexpected
    x = _clip()
    with torch.no_grad():
        # transformers' input is [B, T, C, H, W]
        ours, theirs = model(x), hf(pixel_values=x.permute(0, 2, 1, 3, 4)).logits
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("container", ["bin", "hub-snapshot", "hub-repo"])
def test_timesformer_from_bin_and_hub_cache(tmp_path: Path, container: str) -> None:
    hf, folder = _hf_timesformer(tmp_path)
    if container == "bin":
        path = _as_bin(folder)
    else:
        repo, snap = _as_hub_cache(folder, tmp_path / "hub", "facebook/timesformer-tiny-test")
        path = snap if container == "hub-snapshot" else repo
        assert hf_folder(path) == snap
    model = create_model("timesformer_test").eval()
    assert check_checkpoint(model, path).format == "hf-timesformer"
    load_checkpoint(model, path)
    x = _clip(seed=3)
    with torch.no_grad():
        theirs = hf(pixel_values=x.permute(0, 2, 1, 3, 4)).logits
        torch.testing.assert_close(model(x), theirs, **TOL)


def test_timesformer_export_to_hugging_face(tmp_path: Path) -> None:
    """save_hf writes a folder transformers loads (from_pretrained); same logits; it loads back."""
    torch.manual_seed(0)
    model = create_model("timesformer_test").eval()
    _randomise(model, 4)
    folder = save_hf(model, tmp_path / "export")
    hf = transformers.TimesformerForVideoClassification.from_pretrained(folder).eval()
    x = _clip(seed=5)
    with torch.no_grad():
        theirs = hf(pixel_values=x.permute(0, 2, 1, 3, 4)).logits
        torch.testing.assert_close(theirs, model(x), **TOL)
    back = create_model("timesformer_test")
    load_checkpoint(back, folder)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    with pytest.raises(ValueError, match="space_only"):
        save_hf(create_model("timesformer_test", attention_type="space_only"), tmp_path / "so")


def test_hr_and_l_tables_are_recognised(caplog: pytest.LogCaptureFixture) -> None:
    """An HR checkpoint (785 positions, 16 frames) fits timesformer_hr_vit_b16 as it is; given to
    the 8 x 224 model its tables are resized (the documented 1-D nearest rules) and the log names
    the variant that takes them.
    Checked on the meta device: full-size shapes, no weights."""
    with torch.device("meta"):
        hr, base = create_model("timesformer_hr_vit_b16"), create_model("timesformer_vit_b16")
    hf = hf_state_dict(hr)
    conv = hr.convert_checkpoint(hf)
    assert conv.format == "hf-timesformer"
    shapes = {k: v.shape for k, v in hr.state_dict().items()}
    assert {k: v.shape for k, v in conv.state_dict.items()} == shapes
    with caplog.at_level(logging.INFO, logger="tstl.models.timesformer"):
        conv = base.convert_checkpoint(hf)
    assert conv.state_dict["pos_embed"].shape == (1, 197, 768)
    assert conv.state_dict["time_embed"].shape == (1, 8, 768)
    assert "model.name=timesformer_hr_vit_b16" in caplog.text


# ---------------------------------------------------------------------------------------- VideoMAE


def _vmae_features(hf, x: torch.Tensor) -> torch.Tensor:
    """transformers' backbone output pooled as B-CAST pools it: the token mean through a LayerNorm
    at (1, 0) (B-CAST's vmae_fc_norm at initialisation; VideoMAE's own fc_norm is not loaded, as in
    CAST)."""
    backbone = getattr(hf, "videomae", hf)
    tokens = backbone(pixel_values=x.permute(0, 2, 1, 3, 4)).last_hidden_state
    return F.layer_norm(tokens.mean(1), (tokens.shape[-1],), eps=1e-6)


@pytest.mark.parametrize("cls", ["VideoMAEForVideoClassification", "VideoMAEModel",
                                 "VideoMAEForPreTraining"])
def test_videomae_expert_matches_transformers(tmp_path: Path, cls: str) -> None:
    """At initialisation B-CAST's temporal stream is the pure VideoMAE, so its pooled feature is
    transformers' backbone output, pooled the same way."""
    hf, folder = _hf_videomae(tmp_path, cls)
    torch.manual_seed(0)
    model = create_model("bcast_test", num_classes=5).eval()
    report = load_checkpoint(model, folder)
    assert report.format == "hf-videomae" and not report.unexplained
    backbone = getattr(hf, "videomae", hf)
    assert torch.equal(model.state_dict()["blocks.1.attn.q_bias"],
                       backbone.encoder.layer[1].attention.attention.query.bias)
    # a classifier of the model's shape initialises the head (as CAST)
    if cls == "VideoMAEForVideoClassification":
        assert torch.equal(model.head.weight, hf.classifier.weight)
    x = _clip(seed=6)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x)[1], _vmae_features(hf, x), **TOL)


def test_videomae_from_bin_in_a_hub_cache(tmp_path: Path) -> None:
    hf, folder = _hf_videomae(tmp_path)
    repo, _ = _as_hub_cache(_as_bin(folder), tmp_path / "hub", "MCG-NJU/videomae-tiny-test")
    model = create_model("bcast_test", num_classes=5).eval()
    assert check_checkpoint(model, repo).format == "hf-videomae"
    load_checkpoint(model, repo)
    x = _clip(seed=7)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x)[1], _vmae_features(hf, x), **TOL)


def _rewrite(folder: Path, edit) -> Path:
    sd = safetensors_torch.load_file(str(folder / "model.safetensors"))
    safetensors_torch.save_file(edit(sd), str(folder / "model.safetensors"),
                                metadata={"format": "pt"})
    return folder


def test_transformers_5_bias_names_load_the_same(tmp_path: Path) -> None:
    """A transformers 5 model's own state_dict() names the biases query.bias/value.bias
    (save_pretrained writes q_bias/v_bias); a key bias, which transformers never has, is dropped:
    softmax ignores it."""
    hf, folder = _hf_videomae(tmp_path)

    def v5_names(sd: dict) -> dict:
        out = {k.replace(".q_bias", ".query.bias").replace(".v_bias", ".value.bias"): v
               for k, v in sd.items()}
        out.update({f"videomae.encoder.layer.{i}.attention.attention.key.bias": torch.randn(64)
                    for i in range(2)})
        return out

    model = create_model("bcast_test", num_classes=5).eval()
    load_checkpoint(model, _rewrite(folder, v5_names))
    x = _clip(seed=8)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x)[1], _vmae_features(hf, x), **TOL)


def test_a_conversion_without_q_and_v_biases_is_refused(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    _, folder = _hf_videomae(tmp_path)
    dropped = _rewrite(folder, lambda sd: {k: v for k, v in sd.items()
                                           if not k.endswith(("q_bias", "v_bias"))})
    model = create_model("bcast_test", num_classes=5)
    for check in (check_checkpoint, load_checkpoint):
        with pytest.raises(ValueError, match=r"without query/value biases \(q_bias/v_bias\) in "
                                             r"layers \['0', '1'\]"):
            check(model, dropped)
    names = [f"videomae.encoder.layer.{i}.attention.attention.{b}"
             for i in range(2) for b in ("q_bias", "v_bias")]
    zeros = _rewrite(folder, lambda sd: {**sd, **{k: torch.zeros(64) for k in names}})
    with caplog.at_level(logging.WARNING, logger="tstl.models.bcast"):
        load_checkpoint(model, zeros)
    assert "all exactly zero" in caplog.text


def test_wrong_family_names_the_model_that_takes_it(tmp_path: Path) -> None:
    _, folder = _hf_timesformer(tmp_path)
    with pytest.raises(UnsupportedLayoutError, match="timesformer_vit_b16") as err:
        check_checkpoint(create_model("bcast_test", num_classes=8), folder)
    assert err.value.layout == "hf-timesformer" and str(folder) in str(err.value)
    _, vfolder = _hf_videomae(tmp_path / "v")
    with pytest.raises(UnsupportedLayoutError, match="bcast_vit_b16"):
        load_checkpoint(create_model("timesformer_test"), vfolder)


def test_a_folder_that_is_not_a_model_and_a_bin_with_foreign_globals(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(create_model("timesformer_test"), tmp_path / "empty")
    _, folder = _hf_timesformer(tmp_path)
    sd = safetensors_torch.load_file(str(folder / "model.safetensors"))
    torch.save({**sd, "meta": datetime.timedelta(1)}, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "timesformer"
    with pytest.raises(UntrustedCheckpointError, match="timedelta"):
        load_checkpoint(create_model("timesformer_test"), folder)
