import os

import pytest
import torch

from tests.twostage.conftest import write_random_checkpoint
from tstl.models import create_model
from tstl.twostage.stagefile import (
    frozen_sources_from_paths,
    load_cast_checkpoint,
    load_stage_file,
    param_counts,
    read_stage_file,
    save_stage_file,
    share_frozen,
)

KW = {"num_classes": 3}


@pytest.fixture
def frozen(tmp_path):
    """The frozen weights' source: a checkpoint of the random weights ``_expert`` starts from
    (seed 7)."""
    return frozen_sources_from_paths([write_random_checkpoint(tmp_path / "init.pt", "bcast_test",
                                                              seed=7, **KW)])


def _expert(seed_train: int):
    torch.manual_seed(7)
    m = create_model("bcast_test", **KW)
    torch.manual_seed(seed_train)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))  # "training" touches only trainable params
    return m.eval()


def _x():
    torch.manual_seed(0)
    return torch.randn(2, 3, 4, 32, 32)


def test_roundtrip_trainable_only(tmp_path, frozen):
    m = _expert(1)
    save_stage_file(m, tmp_path / "e.pt", "bcast_test", KW, frozen)
    payload = read_stage_file(tmp_path / "e.pt")
    assert set(payload["trainable"]) == set(m.trainable_state_dict())
    assert len(payload["trainable"]) < len(m.state_dict())
    back = load_stage_file(tmp_path / "e.pt")
    with torch.no_grad():
        torch.testing.assert_close(back(_x()), m(_x()))


def test_experts_share_one_frozen_trunk(tmp_path, frozen):
    a, b = _expert(1), _expert(2)
    save_stage_file(a, tmp_path / "a.pt", "bcast_test", KW, frozen)
    save_stage_file(b, tmp_path / "b.pt", "bcast_test", KW, frozen)
    ea = load_stage_file(tmp_path / "a.pt")
    eb = load_stage_file(tmp_path / "b.pt", trunk=ea)
    frozen_a = {n: p for n, p in ea.named_parameters() if not p.requires_grad}
    for n, p in eb.named_parameters():
        if not p.requires_grad:
            assert p is frozen_a[n]
    with torch.no_grad():
        torch.testing.assert_close(eb(_x()), b(_x()))
        assert not torch.allclose(ea(_x()), eb(_x()))


def test_checkpoint_size_ratio(tmp_path, frozen):
    m = _expert(1)
    t, f = param_counts(m)
    save_stage_file(m, tmp_path / "e.pt", "bcast_test", KW, frozen)
    torch.save(m.state_dict(), tmp_path / "full.pt")
    ratio = os.path.getsize(tmp_path / "e.pt") / os.path.getsize(tmp_path / "full.pt")
    assert ratio < 1.0
    assert ratio == pytest.approx(t / (t + f + sum(b.numel() for b in m.buffers())), abs=0.1)
    # B/16, counted on the meta device (no memory): about 45M trainable of 217M
    with torch.device("meta"):
        big = create_model("bcast_vit_b16", num_classes=174)
    bt, bf = param_counts(big)
    assert bt == 45_071_232 + 769 * 174
    assert bf == 172_023_552
    assert 0.2 < bt / (bt + bf) < 0.22


def test_share_frozen_rejects_other_shapes():
    a = create_model("bcast_test", num_classes=3)
    b = create_model("bcast_test", num_classes=3, embed_dim=32)
    with pytest.raises(ValueError, match="cannot share"):
        share_frozen(a, b)


def test_full_cast_layout_checkpoint_loads(tmp_path):
    m = _expert(3)
    torch.save({"model": m.state_dict()}, tmp_path / "cast.pth")
    back = load_cast_checkpoint("bcast_test", tmp_path / "cast.pth", **KW)
    with torch.no_grad():
        torch.testing.assert_close(back(_x()), m(_x()))


def test_not_a_stage_file(tmp_path):
    torch.save({"model": {}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="x.pt: not a"):
        read_stage_file(tmp_path / "x.pt")


def test_files_of_the_old_format_name_still_load(tmp_path, frozen):
    m = _expert(1)
    save_stage_file(m, tmp_path / "e.pt", "bcast_test", KW, frozen)
    assert read_stage_file(tmp_path / "e.pt")["format"] == "tstl-stage/v1"
    # written before the rename
    old = {**torch.load(tmp_path / "e.pt", weights_only=True), "format": "tstl-expert/v1"}
    torch.save(old, tmp_path / "old.pt")
    with torch.no_grad():
        torch.testing.assert_close(load_stage_file(tmp_path / "old.pt")(_x()), m(_x()))


def test_head_rows_adapter_takes_a_groups_rows_of_a_full_head(tmp_path, caplog):
    from tstl.models import load_checkpoint
    from tstl.twostage.stages import head_rows

    torch.manual_seed(0)
    cast = create_model("bcast_test", num_classes=5)
    torch.nn.init.normal_(cast.head.weight)
    torch.save({"model": cast.state_dict()}, tmp_path / "cast.pth")
    expert = create_model("bcast_test", num_classes=2)
    load_checkpoint(expert, tmp_path / "cast.pth", reinit_mismatched=("head.",),
                    adapters=[head_rows([3, 1], 5)])
    torch.testing.assert_close(expert.head.weight, cast.head.weight[[3, 1]])
    torch.testing.assert_close(expert.head.bias, cast.head.bias[[3, 1]])
    # a head over another dataset's classes is not taken: the expert's head keeps its initialisation
    other = create_model("bcast_test", num_classes=2)
    before = other.head.weight.clone()
    with caplog.at_level("WARNING"):
        load_checkpoint(other, tmp_path / "cast.pth", reinit_mismatched=("head.",),
                        adapters=[head_rows([3, 1], 7)])
    torch.testing.assert_close(other.head.weight, before)
    assert "head has 5 classes, this dataset 7" in caplog.text
    with pytest.raises(ValueError, match="cannot take rows"):
        load_checkpoint(create_model("bcast_test", num_classes=2), tmp_path / "cast.pth",
                        adapters=[head_rows([3, 7], 5)])
