"""Routed multi-view evaluation against a hand computation, and TSTL's released (full-head)
checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tstl.models import create_model
from tstl.twostage.evaluate import RoutedModels, load_released, predict_routed, summarize
from tstl.twostage.groups import ClassGroups
from tstl.twostage.routing import route

GROUPS = ClassGroups(((0, 3), (1, 2)), 4)


def _linear(w: np.ndarray) -> nn.Module:
    m = nn.Linear(w.shape[1], w.shape[0], bias=False)
    m.weight.data = torch.tensor(w, dtype=torch.float32)
    return m


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("top_k", [1, 2])
def test_routed_views_merge_like_a_hand_computation(top_k: int) -> None:
    rng = np.random.default_rng(0)
    ws, w0, w1 = rng.normal(size=(2, 5)), rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
    models = RoutedModels(_linear(ws), [_linear(w0), _linear(w1)], GROUPS)
    x = rng.normal(size=(12, 5)).astype(np.float32)  # 6 videos x 2 views
    labels = np.array([0, 1, 2, 3, 0, 2])
    keys = [f"v{i}" for i in range(6)]
    batches = [{"video": torch.tensor(x[i:i + 4]),
                "label": torch.tensor(np.repeat(labels, 2)[i:i + 4]),
                "key": [keys[j // 2] for j in range(i, i + 4)],
                "view": torch.tensor([j % 2 for j in range(i, i + 4)])}
               for i in range(0, 12, 4)]
    local, tally = predict_routed(models, batches, torch.device("cpu"), top_k)
    res = summarize([local], [tally], GROUPS, top_k)

    s = _softmax(x @ ws.T)
    experts = [_softmax(x @ w0.T), _softmax(x @ w1.T)]
    full = np.zeros((2, 12, 4))  # each expert's output placed in global class space
    for g, members in enumerate(GROUPS.groups):
        full[g][:, list(members)] = experts[g]
    top = s.argmax(1)
    hard = full[top, np.arange(12)]
    soft = hard if top_k == 1 else s[:, 0:1] * full[0] + s[:, 1:2] * full[1]
    true_group = GROUPS.class_to_group[np.repeat(labels, 2)]
    oracle = full[true_group, np.arange(12)]
    # some views misrouted: oracle differs from hard routing
    assert 0 < (top != true_group).sum() < 12
    per_video = lambda p: p.reshape(6, 2, -1).mean(1)  # noqa: E731
    methods = res["summary"]["methods"]
    for name, p in (("hard", hard), ("soft", soft), ("oracle", oracle)):
        assert (methods[name]["top1"]
                == pytest.approx(float((per_video(p).argmax(1) == labels).mean()))), name
    sel_video = per_video(s).argmax(1)
    assert (res["summary"]["selector_acc"]
            == pytest.approx(float((sel_video == GROUPS.class_to_group[labels]).mean())))
    for e in res["summary"]["experts"]:
        mine = GROUPS.class_to_group[labels] == e["group"]
        assert e["videos"] == mine.sum()
        assert (e["accuracy"]
                == pytest.approx(float((per_video(oracle).argmax(1) == labels)[mine].mean())))
    f = res["summary"]["forwards"]
    assert f["selector"] == 12 and f["hard_routed"] == np.bincount(top, minlength=2).tolist()
    assert sum(f["routed_experts"]) == 12 * top_k  # only the chosen experts ran
    # the true group's expert runs again only for views the selector sent elsewhere
    assert f["oracle_extra"] == (int((top != true_group).sum()) if top_k == 1 else 0)
    assert (methods["hard"]["forwards_per_view"] == 2
            and methods["soft"]["forwards_per_view"] == 1 + top_k)


def test_released_tstl_checkpoints_with_full_class_heads(tmp_path) -> None:
    torch.manual_seed(0)
    sel = create_model("bcast_test", num_classes=2)
    full = [create_model("bcast_test", num_classes=4) for _ in range(2)]
    for m in (sel, *full):  # non-zero heads, so the column choice matters
        nn.init.normal_(m.head.weight)
    torch.save({"model": sel.state_dict()}, tmp_path / "selector.pth")
    for g, m in enumerate(full):
        torch.save({"module": m.state_dict()}, tmp_path / f"expert-{g}.pth")
    models = load_released("bcast_test", tmp_path / "selector.pth",
                           [tmp_path / "expert-0.pth", tmp_path / "expert-1.pth"], GROUPS)
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(models.selector(x), sel.eval()(x))
        torch.testing.assert_close(models.experts[1](x), full[1].eval()(x))
        # as TSTL: the chosen expert's softmax over all classes is the prediction, even outside its
        # group
        sel_logits = torch.tensor([[0.0, 9.0], [0.0, 9.0]])
        out = route(x, sel_logits, models.experts, GROUPS, top_k=1)
        torch.testing.assert_close(out.probs, full[1](x).softmax(-1))
    with pytest.raises(ValueError, match="head has 4 outputs, the groups 2"):
        load_released("bcast_test", tmp_path / "expert-0.pth", [tmp_path / "expert-0.pth"] * 2,
                      GROUPS)
