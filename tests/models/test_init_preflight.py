"""``tstl train --check`` / ``tstl train-tstl --check`` open every ``model.init`` / ``tstl.init``
file against the model built on the meta device: each failure kind exits 2 naming the file and the
fix, before any launcher starts; a good file passes. Files are the reference layouts of
test_official_checkpoints.py (numpy-pickled optimizer state,
fp16 DeepSpeed module) and a Hugging Face folder."""

from __future__ import annotations

import datetime
import io
import re
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from tstl import cli
from tstl.core import exitcodes
from tstl.models import checkpoint as ck
from tstl.models import create_model
from tstl.models.checkpoint import read_checkpoint

from .test_official_checkpoints import (
    _amp_checkpoint,
    _args,
    _deepspeed_model_states,
    _save,
    _seeded,
)

ROOT = Path(__file__).resolve().parents[2]
# the shipped UCF101 x B-CAST layers, with the tiny B-CAST so the test files stay small
BCAST = ["--config", str(ROOT / "configs/data/ucf101.yaml"),
         str(ROOT / "configs/model/bcast_vit_b16.yaml"), "model.name=bcast_test"]


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


@pytest.fixture()
def shards_dir(tmp_path: Path) -> Path:
    for split in ("train_split1", "test_split1"):
        (tmp_path / "ucf101/shards" / split).mkdir(parents=True)
        (tmp_path / "ucf101/shards" / split / "shards.json").write_text("{}")
    return tmp_path


def _check(shards_dir: Path, *init: Path, key: str = "model.init") -> tuple[int, str]:
    command = "train-tstl" if key == "tstl.init" else "train"
    tstl = ([str(ROOT / "configs/tstl/default.yaml"), "tstl.num_groups=2"]
            if command == "train-tstl" else [])
    code, out, err = _cli(command, "--check", *BCAST, *tstl, f"data_dir={shards_dir}",
                          f"{key}=[{','.join(str(p) for p in init)}]")
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    # one error line, the last
    assert code == exitcodes.OK or (len(errors) == 1 and err.splitlines()[-1] == errors[0]), err
    return code, out + "".join(errors)


def _cast_file(path: Path, seed: int = 3, deepspeed: bool = False, **kwargs) -> Path:
    src = _seeded("bcast_test", seed, **{"num_classes": 5, **kwargs})
    ckpt = (_deepspeed_model_states(src.state_dict(), src, {"epoch": "best"}) if deepspeed
            else _amp_checkpoint(src.state_dict(), src, "best", _args()))
    return _save(ckpt, path, "numpy1")


def test_reference_files_pass(tmp_path: Path, shards_dir: Path) -> None:
    """CAST's checkpoint-best.pth (numpy 1.x names) and a DeepSpeed tag folder (fp16 module): ready;
    a head of another number of classes is re-initialised as training does, so 5 vs the dataset's
    101 classes is fine."""
    amp = _cast_file(tmp_path / "checkpoint-best.pth")
    (tmp_path / "checkpoint-49").mkdir()
    _cast_file(tmp_path / "checkpoint-49" / "mp_rank_00_model_states.pt", deepspeed=True)
    code, text = _check(shards_dir, amp, tmp_path / "checkpoint-49")
    assert code == exitcodes.OK and text.startswith("ok: ucf101 bcast_test"), text
    code, text = _check(shards_dir, amp, key="tstl.init")
    assert code == exitcodes.OK and text.startswith("ok: TSTL ucf101"), text


def test_refused_format(tmp_path: Path, shards_dir: Path) -> None:
    src = _seeded("bcast_test", 1, num_classes=5)
    ckpt = _amp_checkpoint(src.state_dict(), src, 1, _args())
    path = _save({**ckpt, "when": datetime.timedelta(1)}, tmp_path / "checkpoint-1.pth")
    code, text = _check(shards_dir, path)
    assert code == exitcodes.USAGE and f"model.init: {path}: refused" in text
    assert "datetime.timedelta" in text
    assert "model.trusted_checkpoints" in text
    code, text = _check(shards_dir, path, key="tstl.init")
    assert code == exitcodes.USAGE and f"tstl.init: {path}: refused" in text


def test_trusted_listed_file_passes(tmp_path: Path, shards_dir: Path) -> None:
    src = _seeded("bcast_test", 1, num_classes=5)
    ckpt = _amp_checkpoint(src.state_dict(), src, 1, _args())
    path = _save({**ckpt, "when": datetime.timedelta(1)}, tmp_path / "checkpoint-1.pth")
    code, _, err = _cli("train", "--check", *BCAST, f"data_dir={shards_dir}",
                        f"model.init=[{path}]", f"model.trusted_checkpoints=[{path}]")
    assert code == exitcodes.OK, err


def test_wrong_family(tmp_path: Path, shards_dir: Path) -> None:
    tsf = _seeded("timesformer_test", 2)
    state = {f"model.{k}": v for k, v in tsf.state_dict().items()}
    path = _save({"model_state": state, "epoch": 15},
                 tmp_path / "TimeSformer_divST_8x32_224_K400.pyth")
    code, text = _check(shards_dir, path)
    assert code == exitcodes.USAGE and str(path) in text and "TimeSformer model" in text
    assert "timesformer_vit_b16" in text and "model.name" in text


def test_missing_keys(tmp_path: Path, shards_dir: Path) -> None:
    """A VideoMAE file that lacks one of the expert's own tensors (a truncated conversion)."""
    sd = _seeded("bcast_test", 4, num_classes=5).state_dict()
    expert = r"^(patch_embed\.|blocks\.\d+\.(norm1|attn|norm2|mlp)\.)"
    vmae = {k: v for k, v in sd.items() if re.match(expert, k)}
    del vmae["blocks.1.mlp.fc2.weight"]
    path = _save({"model": vmae}, tmp_path / "videomae.pth")
    code, text = _check(shards_dir, path)
    assert code == exitcodes.USAGE and str(path) in text and "blocks.1.mlp.fc2.weight" in text
    assert "model keys it lacks" in text and "model.kwargs" in text


def test_shape_mismatch(tmp_path: Path, shards_dir: Path) -> None:
    """A CAST file of another clip length: its time tables do not fit, and no documented resize
    covers them."""
    path = _cast_file(tmp_path / "checkpoint-best.pth", num_frames=8)
    code, text = _check(shards_dir, path)
    assert code == exitcodes.USAGE and str(path) in text and "shape mismatch" in text
    assert "clip_time_pos: checkpoint (4, 32) vs model (2, 32)" in text and "num_frames" in text


def test_unreadable_file(tmp_path: Path, shards_dir: Path) -> None:
    path = tmp_path / "checkpoint-best.pth"
    path.write_bytes(b"<html>download quota exceeded</html>")
    code, text = _check(shards_dir, path)
    assert code == exitcodes.USAGE and f"{path}: cannot be read as a torch checkpoint" in text
    assert "re-download" in text


def test_hugging_face_folder_and_clip_pass(tmp_path: Path, shards_dir: Path) -> None:
    transformers = pytest.importorskip("transformers", reason="pip install -e .[dev]")
    config = transformers.VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2,
                                         hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=256)
    transformers.VideoMAEForPreTraining(config).save_pretrained(tmp_path / "videomae")
    code, text = _check(shards_dir, tmp_path / "videomae")
    assert code == exitcodes.OK, text
    config.hidden_size, config.intermediate_size = 32, 128  # a VideoMAE of another width
    transformers.VideoMAEForPreTraining(config).save_pretrained(tmp_path / "videomae-s")
    code, text = _check(shards_dir, tmp_path / "videomae-s")
    assert code == exitcodes.USAGE and "shape mismatch" in text and "videomae-s" in text


def test_the_check_reads_no_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Zip pickles are memory-mapped and everything comes back on the meta device; the meta model
    stays meta."""
    path = _cast_file(tmp_path / "checkpoint-best.pth")
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("mmap"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    sd = read_checkpoint(path, meta=True)
    assert calls == [True] and all(t.is_meta for t in sd.values())
    with torch.device("meta"):
        model = create_model("bcast_test", num_classes=5)
    report = ck.check_checkpoint(model, path)
    assert report.format == "cast" and not report.missing
    assert all(p.is_meta for p in model.parameters())
