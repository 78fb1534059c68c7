"""``tstl export --format onnx``: every registered family's tiny variant through onnxruntime
against PyTorch, the sidecar, outputs of several heads, and the refusals (TSTL runs, operators
without an ONNX form)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from tests.predict.conftest import hand_run
from tstl.core.exitcodes import UsageError
from tstl.models import create_model, list_models, load_checkpoint
from tstl.predict.export import CHECK_TOLERANCE, _Flat, _onnx_bytes, export

FAMILIES = [("bcast_test", {}), ("timesformer_test", {"attention_type": "divided_space_time"}),
            ("timesformer_test", {"attention_type": "joint_space_time"}),
            ("timesformer_test", {"attention_type": "space_only"})]


def test_every_registered_family_has_a_tiny_variant_here() -> None:
    families = {name.split("_")[0] for name in list_models()}
    assert families == {name.split("_")[0] for name, _ in FAMILIES}, "add the family to FAMILIES"


@pytest.mark.parametrize(("name", "kwargs"), FAMILIES,
                         ids=["bcast", "divided", "joint", "space_only"])
def test_onnxruntime_matches_pytorch(tmp_path: Path, name: str, kwargs: dict) -> None:
    ckpt = hand_run(tmp_path / "run", name, num_classes=5, **kwargs)
    paths = export(ckpt, tmp_path / "out" / "model.onnx", configs=[tmp_path / "run/config.yaml"])
    meta = json.loads(paths["sidecar"].read_text())
    assert meta["check"]["max_abs_diff"] <= CHECK_TOLERANCE and meta["outputs"] == ["logits"]
    assert meta["input"]["shape"] == ["batch", 3, 4, 32, 32] and meta["num_frames"] == 4
    assert meta["classes"] == [f"class_{i}" for i in range(5)]  # no shard set for this run
    assert meta["prepare"]["height"] == 240 and "libx264" in meta["prepare"]["ffmpeg_args"]
    # independently of export's own check: a fresh model from the checkpoint, another batch size
    model = create_model(name, num_classes=5, **kwargs)
    load_checkpoint(model, ckpt)
    x = torch.randn(4, 3, 4, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = model.eval()(x).numpy()
    got = ort.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"]).run(
        None, {"video": x.numpy()})[0]
    assert got.shape == (4, 5) and want.std() > 0.01  # logits that vary: the comparison can fail
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


class TwoHeads(nn.Module):
    """A classifier with a verb and a noun head (EPIC-KITCHENS style) returning a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3 * 2 * 8 * 8, 16)
        self.verb, self.noun = nn.Linear(16, 3), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.body(x.flatten(1)).relu()
        return {"verb": self.verb(f), "noun": self.noun(f)}


def test_dict_outputs_become_named_onnx_outputs() -> None:
    torch.manual_seed(0)
    model = TwoHeads().eval()
    x = torch.randn(2, 3, 2, 8, 8)
    flat = _Flat(model, x)
    data = _onnx_bytes(flat, x, 17, "two heads")
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["verb", "noun"]
    x3 = torch.randn(3, 3, 2, 8, 8)
    verb, noun = session.run(None, {"video": x3.numpy()})
    with torch.no_grad():
        out = model(x3)
    np.testing.assert_allclose(verb, out["verb"].numpy(), atol=1e-5)
    np.testing.assert_allclose(noun, out["noun"].numpy(), atol=1e-5)


class Unexportable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svd(x.flatten(2))[1]


def test_an_operator_without_an_onnx_form_is_refused_with_its_name() -> None:
    x = torch.randn(1, 3, 2, 4, 4)
    with pytest.raises(UsageError, match=r"cannot be exported to ONNX opset 17: .*svd"):
        _onnx_bytes(_Flat(Unexportable(), x), x, 17, "svd model")


def test_refusals_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tstl.cli import main

    (tmp_path / "tstl/selector").mkdir(parents=True)
    (tmp_path / "tstl/groups.json").write_text("{}")

    def run(*args: object) -> tuple[int, str]:
        code = main(["export", "--checkpoint", *map(str, args)])
        return code, capsys.readouterr().err

    code, err = run(tmp_path / "tstl", "--out", tmp_path / "m.onnx")
    assert code == 2 and "is a TSTL run" in err and "use tstl predict" in err
    ckpt = hand_run(tmp_path / "run", "bcast_test")
    code, err = run(ckpt, "--out", tmp_path / "m.bin")
    assert code == 2 and "not an .onnx file name" in err
    code, err = run(ckpt, "--out", tmp_path / "m.onnx")
    assert code == 2 and "give --config" in err
    assert not (tmp_path / "m.onnx").exists()
