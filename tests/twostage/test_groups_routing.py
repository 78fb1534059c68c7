import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tstl.twostage.groups import (
    ClassGroups,
    GroupFileError,
    balanced_groups,
    confusion_groups,
    load_groups,
    save_groups,
)
from tstl.twostage.routing import route

# The real TSTL file, from the shared/ folder that sits beside the checkout (as in CI).
SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tstl-class_grouping.json"


def test_loads_real_tstl_file():
    g = load_groups(SAMPLE)
    assert (g.num_groups, g.num_classes) == (15, 174)
    grp, loc = g.to_local([13, 0, 173, 1])
    assert grp.tolist() == [1, 1, 1, 0] and loc.tolist() == [0, 9, 11, 0]
    assert g.to_global(grp, loc).tolist() == [13, 0, 173, 1]


@pytest.mark.parametrize("fmt", ["ours", "tstl"])
def test_roundtrip_both_formats(tmp_path, fmt):
    g = load_groups(SAMPLE)
    save_groups(g, tmp_path / "g.json", fmt)
    assert load_groups(tmp_path / "g.json") == g
    labels = np.arange(174)
    assert (g.to_global(*g.to_local(labels)) == labels).all()


def _tstl_dict():
    with open(SAMPLE) as f:
        return json.load(f)


@pytest.mark.parametrize("mutate,msg", [
    (lambda d: d["head_to_classes"]["0"].append(13), "group 0 and group 1"),
    (lambda d: d["head_to_classes"]["0"].remove(1), "in no group"),
    (lambda d: d["class_to_head"].update({"1": 3}), "class_to_head[1]=3"),
    (lambda d: d["head_to_local"]["0"].update({"1": 5}), "head_to_local[0][1]=5"),
    (lambda d: d["head_to_classes"]["0"].append(999), "outside"),
    (lambda d: d.pop("num_heads"), "lacks 'num_heads'"),
])
def test_validation_errors_name_file(tmp_path, mutate, msg):
    d = _tstl_dict()
    mutate(d)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    with pytest.raises(GroupFileError, match=re.escape(msg)) as e:
        load_groups(p)
    assert "bad.json" in str(e.value)


def test_our_format_validation(tmp_path):
    p = tmp_path / "g.json"
    p.write_text(json.dumps({"format": "tstl-groups/v1", "num_classes": 4,
                             "groups": [[0, 1], [2]]}))
    with pytest.raises(GroupFileError, match=r"\[3\] are in no group"):
        load_groups(p)
    p.write_text(json.dumps({"num_classes": 4, "groups": [[0, 1], [2, 3]]}))
    with pytest.raises(GroupFileError, match="format"):
        load_groups(p)


def test_balanced():
    g = balanced_groups(10, 4)
    assert [len(m) for m in g.groups] == [3, 3, 2, 2]
    assert g.groups[0] == (0, 1, 2)


def test_confusion_recovers_planted_blocks():
    rng = np.random.default_rng(0)
    n, k = 12, 4
    perm = rng.permutation(n)
    truth = [sorted(perm[i * 3:(i + 1) * 3].tolist()) for i in range(k)]
    conf = rng.uniform(0, 1, (n, n))
    for blk in truth:
        conf[np.ix_(blk, blk)] += 20
    np.fill_diagonal(conf, 100)
    g = confusion_groups(conf, k)
    assert sorted(map(list, g.groups)) == sorted(truth)
    assert all(len(m) == 3 for m in g.groups)


def test_confusion_balance_cap():
    conf = np.ones((8, 8))
    conf[:6, :6] += 50  # one big confused block must be split to respect ceil(8/4)=2
    g = confusion_groups(conf, 4)
    assert all(len(m) == 2 for m in g.groups)


def _setup():
    groups = ClassGroups(((0, 2), (1, 3, 4), (5,)), 6)
    calls = []

    def make(g, w):
        def f(x):
            calls.append((g, x[:, 0].tolist()))
            return x[:, : len(groups.groups[g])] * w
        return f

    experts = [make(0, 1.0), make(1, 2.0), make(2, 1.0)]
    x = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, -1.0], [3.0, 3.0, 0.0]])
    sel = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0], [0.0, 3.0, 1.0]])
    return groups, experts, x, sel, calls


def _softmax(v):
    e = np.exp(np.asarray(v) - np.max(v))
    return e / e.sum()


def test_hard_routing_exact_and_sparse():
    groups, experts, x, sel, calls = _setup()
    out = route(x, sel, experts, groups, top_k=1)
    exp = np.zeros((3, 6))
    exp[0, [0, 2]] = _softmax([0.0, 1.0])
    exp[1, [5]] = 1.0
    exp[2, [1, 3, 4]] = _softmax([6.0, 6.0, 0.0])
    np.testing.assert_allclose(out.probs.numpy(), exp, rtol=1e-6, atol=1e-7)
    assert out.expert_calls == [1, 1, 1]
    # each expert ran once, on only its rows
    assert sorted(calls) == [(0, [0.0]), (1, [3.0]), (2, [1.0])]


def test_soft_routing_exact():
    groups, experts, x, sel, _calls = _setup()
    out = route(x, sel, experts, groups, top_k=2)
    exp = np.zeros((3, 6))
    for i in range(3):
        p = _softmax(sel[i].numpy())
        top = np.argsort(-p)[:2]
        w = p[top] / p[top].sum()
        for wg, g in zip(w, top):
            members = list(groups.groups[g])
            logits = x[i, : len(members)].numpy() * (2.0 if g == 1 else 1.0)
            exp[i, members] += wg * _softmax(logits)
    np.testing.assert_allclose(out.probs.numpy(), exp, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.probs.sum(1).numpy(), 1.0, rtol=1e-6)
    assert sum(out.expert_calls) == 6  # 2 experts per sample, not 3


def test_never_runs_unselected_expert():
    groups, experts, x, _, calls = _setup()
    sel = torch.tensor([[5.0, 0.0, 0.0]] * 3)
    out = route(x, sel, experts, groups)
    assert out.expert_calls == [3, 0, 0] and [c[0] for c in calls] == [0]


def test_slot_probs_give_hard_and_soft_from_one_pass():
    groups, experts, x, sel, _ = _setup()
    soft = route(x, sel, experts, groups, top_k=2)
    hard = route(x, sel, experts, groups, top_k=1)
    torch.testing.assert_close(soft.slot_probs[:, 0], hard.probs)
    torch.testing.assert_close((soft.weights.unsqueeze(-1) * soft.slot_probs).sum(1), soft.probs)
    assert soft.groups[:, 0].tolist() == hard.groups[:, 0].tolist() == [0, 2, 1]
