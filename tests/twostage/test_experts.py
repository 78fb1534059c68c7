import os

import pytest
import torch

from tstl.models import create_model
from tstl.twostage.experts import (
    load_cast_checkpoint, load_expert, param_counts, read_expert, save_expert, share_frozen,
)

KW = {"num_classes": 3}
FROZEN = {"random_init_seed": 7}


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


def test_roundtrip_trainable_only(tmp_path):
    m = _expert(1)
    save_expert(m, tmp_path / "e.pt", "bcast_test", KW, FROZEN)
    payload = read_expert(tmp_path / "e.pt")
    assert set(payload["trainable"]) == set(m.trainable_state_dict())
    assert len(payload["trainable"]) < len(m.state_dict())
    back = load_expert(tmp_path / "e.pt")
    with torch.no_grad():
        torch.testing.assert_close(back(_x()), m(_x()))


def test_experts_share_one_frozen_trunk(tmp_path):
    a, b = _expert(1), _expert(2)
    save_expert(a, tmp_path / "a.pt", "bcast_test", KW, FROZEN)
    save_expert(b, tmp_path / "b.pt", "bcast_test", KW, FROZEN)
    ea = load_expert(tmp_path / "a.pt")
    eb = load_expert(tmp_path / "b.pt", trunk=ea)
    frozen_a = {n: p for n, p in ea.named_parameters() if not p.requires_grad}
    for n, p in eb.named_parameters():
        if not p.requires_grad:
            assert p is frozen_a[n]
    with torch.no_grad():
        torch.testing.assert_close(eb(_x()), b(_x()))
        assert not torch.allclose(ea(_x()), eb(_x()))


def test_checkpoint_size_ratio(tmp_path):
    m = _expert(1)
    t, f = param_counts(m)
    save_expert(m, tmp_path / "e.pt", "bcast_test", KW, FROZEN)
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


def test_not_an_expert_file(tmp_path):
    torch.save({"model": {}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="x.pt: not a"):
        read_expert(tmp_path / "x.pt")
