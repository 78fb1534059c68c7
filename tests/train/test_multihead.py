"""Several heads (EPIC-KITCHENS verb + noun): labels read once, one mixup lambda for every head, the
summed loss, the per-head multi-view merge and the action metrics (CAST's rules, by hand), the
reports, and TSTL's refusal.

References (KHU-VLL/CAST@51eb871): ``util_tools/mixup.py:218-221`` (one ``lam``, ``mixup_target``
per head over its own classes), ``engine_for_compomodel.py:14-19`` (loss noun + verb), ``:289-330``
(softmax per view, views de-duplicated by chunk/split, mean) and ``:332-335`` (action top-1: both
argmaxes right; action top-5: each label in its head's top 5; action id ``verb * 1000 + noun``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from tstl.core import shards as fmt
from tstl.data.device import MixupCutmix, MultiHeadMixup, ToDevice
from tstl.data.labels import collate_labels, sample_labels
from tstl.train.config import TrainConfig
from tstl.train.evaluate import (
    MultiHeadResult,
    action_id,
    head_metrics,
    merge_heads,
    predict,
    save_report,
)
from tstl.train.report import write_report
from tstl.train.trainer import Trainer

HEADS = {"verb": 4, "noun": 3}


def test_labels_come_from_cls_or_from_the_json_heads() -> None:
    assert sample_labels(b"3", {"label": 3}, None) == 3
    meta = {fmt.LABELS: {"verb": 2, "noun": 1}, "label": 2}
    assert sample_labels(b"2", meta, HEADS) == {"verb": 2, "noun": 1}
    with pytest.raises(ValueError, match="noun label 3 outside the shard set's noun classes 0..2"):
        sample_labels(b"2", {fmt.LABELS: {"verb": 2, "noun": 3}}, HEADS)
    with pytest.raises(KeyError):
        sample_labels(b"2", {"label": 2}, HEADS)  # a one-label sample in a multi-head set: bad
    batch = collate_labels([{"verb": 1, "noun": 2}, {"verb": 3, "noun": 0}])
    assert set(batch) == {"verb", "noun"} and batch["verb"].tolist() == [1, 3]
    assert batch["noun"].dtype == torch.long
    assert collate_labels([4, 5]).tolist() == [4, 5]


def test_one_mixup_lambda_for_every_head_with_smoothing_per_head() -> None:
    kw = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.0, label_smoothing=0.1)
    video = torch.randn(4, 3, 2, 8, 8)
    labels = {"verb": torch.tensor([0, 1, 2, 3]), "noun": torch.tensor([2, 0, 1, 2])}
    stage = MixupCutmix(MultiHeadMixup(HEADS, **kw))
    batch = stage({"video": video.clone(), "label": labels}, seed=7)
    one = MixupCutmix(Mixup(num_classes=4, **kw))  # timm on the verbs alone, same seed: same draw
    ref = one({"video": video.clone(), "label": labels["verb"]}, seed=7)
    torch.testing.assert_close(batch["video"], ref["video"])
    torch.testing.assert_close(batch["label"]["verb"], ref["label"])
    # the lambda, read off the verbs (sample 0: its verb 0 and, flipped, verb 3), mixes the nouns
    # the same way (batch reversed), smoothed over the nouns' 3 classes
    v_off, v_on = 0.1 / 4, 0.9 + 0.1 / 4
    lam = float((batch["label"]["verb"][0, 0] - v_off) / (v_on - v_off))
    assert 0.0 < lam < 1.0 and lam != 0.5
    off, on = 0.1 / 3, 0.9 + 0.1 / 3
    onehot = torch.full((4, 3), off).scatter_(1, labels["noun"][:, None], on)
    torch.testing.assert_close(batch["label"]["noun"], lam * onehot + (1 - lam) * onehot.flip(0))
    assert batch["label"]["noun"].sum(1).allclose(torch.ones(4))


def test_to_device_moves_every_head() -> None:
    batch = {"video": torch.zeros(1), "label": {"verb": torch.ones(2)}}
    out = ToDevice(torch.device("cpu"))(batch, 0)
    assert out["label"]["verb"].device.type == "cpu"


class _Engine(torch.nn.Module):
    """Stands in for the DeepSpeed engine: two heads, records backward/step."""

    def __init__(self) -> None:
        super().__init__()
        self.verb, self.noun = torch.nn.Linear(2, 4), torch.nn.Linear(2, 3)
        self.steps = 0

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"verb": self.verb(x), "noun": self.noun(x)}

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.steps += 1


def _trainer(smoothing: float = 0.1) -> Trainer:
    trainer = object.__new__(Trainer)  # only what loss/train_step touch
    trainer.cfg = TrainConfig()
    trainer.cfg.data.label_smoothing = smoothing
    trainer.engine, trainer.device, trainer.dtype = _Engine(), torch.device("cpu"), torch.float32
    trainer.step, trainer.nonfinite = 0, 0
    trainer.criterion_soft = SoftTargetCrossEntropy()
    return trainer


def test_the_loss_is_the_sum_of_the_heads_each_smoothed_over_its_classes() -> None:
    trainer = _trainer(0.1)
    logits = {"verb": torch.randn(3, 4), "noun": torch.randn(3, 3)}
    hard = {"verb": torch.tensor([0, 3, 1]), "noun": torch.tensor([2, 2, 0])}
    want = sum(F.cross_entropy(logits[h], hard[h], label_smoothing=0.1) for h in logits)
    torch.testing.assert_close(trainer.loss(logits, hard), want)
    soft = {h: torch.softmax(torch.randn(3, n), -1) for h, n in HEADS.items()}
    want = sum(-(soft[h] * logits[h].log_softmax(-1)).sum(-1).mean() for h in logits)
    torch.testing.assert_close(trainer.loss(logits, soft), want)
    with pytest.raises(ValueError, match="need one label each"):
        trainer.loss(logits, hard["verb"])
    batch = {"video": torch.randn(3, 2), "label": hard, "key": ["a", "b", "c"]}
    assert trainer.train_step(batch) is not None and trainer.engine.steps == 1
    assert trainer.engine.verb.weight.grad is not None
    assert trainer.engine.noun.weight.grad is not None


def _views(z: dict, y: dict) -> tuple[dict, dict]:
    return ({h: np.asarray(v, dtype=np.float32) for h, v in z.items()}, y)


def test_multi_head_merge_and_action_metrics_by_hand() -> None:
    # video a: 2 views (one repeated on another rank: counted once); b, c: one view each
    a0 = _views({"verb": [5, 0, 0, 0], "noun": [0, 3, 0]}, {"verb": 0, "noun": 1})
    a1 = _views({"verb": [0, 1, 0, 0], "noun": [0, 1, 2]}, {"verb": 0, "noun": 1})
    b0 = _views({"verb": [0, 0, 2, 0], "noun": [1, 0, 0]}, {"verb": 2, "noun": 2})
    c0 = _views({"verb": [0, 0, 0, 1], "noun": [0, 0, 4]}, {"verb": 1, "noun": 2})
    rank0 = {("a", 0): a0, ("a", 1): a1, ("b", 0): b0}
    rank1 = {("a", 1): a1, ("c", 0): c0}
    res = head_metrics(merge_heads([rank0, rank1], "mean_softmax"), HEADS)
    assert isinstance(res, MultiHeadResult) and res.videos == 3

    def sm(v):
        e = np.exp(np.asarray(v, dtype=np.float64) - max(v))
        return e / e.sum()

    pa = (sm([5, 0, 0, 0]) + sm([0, 1, 0, 0])) / 2
    np.testing.assert_allclose(res.heads["verb"].probs["a"], pa, rtol=1e-6)
    # verb: a right (argmax 0), b right, c wrong (argmax 3, label 1) -> 2/3; noun: a right, b wrong,
    # c right -> 2/3; action (both right): a only -> 1/3
    assert res.heads["verb"].top1 == pytest.approx(2 / 3)
    assert res.heads["noun"].top1 == pytest.approx(2 / 3)
    assert res.top1 == pytest.approx(1 / 3)
    # top-5: 4 verbs and 3 nouns are all in the top 5 -> 1
    assert res.top5 == 1.0
    assert action_id({"verb": 2, "noun": 17}) == 2017  # CAST: verb * 1000 + noun
    assert res.actions == {1: (1, 1), 2002: (1, 0), 1002: (1, 0)}
    summary = res.summary()
    assert summary["mean_class_acc"] == pytest.approx(1 / 3)
    assert set(summary["heads"]) == {"verb", "noun"} and summary["top1"] == res.top1


def test_action_top5_needs_every_head_in_its_top5() -> None:
    many = {"verb": 8, "noun": 6}
    z = {"verb": np.arange(8, dtype=np.float32), "noun": np.arange(6, dtype=np.float32)}
    # verb label 1: rank 7 of 8 (outside the top 5); noun label 5: first
    res = head_metrics(merge_heads([{("v", 0): (z, {"verb": 1, "noun": 5})}], "mean_softmax"), many)
    assert res.heads["noun"].top5 == 1.0 and res.heads["verb"].top5 == 0.0 and res.top5 == 0.0
    res = head_metrics(merge_heads([{("v", 0): (z, {"verb": 4, "noun": 2})}], "mean_softmax"), many)
    assert res.top5 == 1.0 and res.top1 == 0.0


def test_predict_keeps_every_heads_logits_per_view() -> None:
    engine = _Engine().eval()
    batch = {"video": torch.randn(2, 2), "key": ["x", "y"], "view": torch.tensor([0, 1]),
             "label": {"verb": torch.tensor([1, 2]), "noun": torch.tensor([0, 2])}}
    out = predict(engine, [batch], torch.device("cpu"))
    z, y = out[("y", 1)]
    assert y == {"verb": 2, "noun": 2}
    want = engine(batch["video"])["noun"][1].detach().numpy()
    np.testing.assert_allclose(z["noun"], want, rtol=1e-6)


def test_reports_show_verb_noun_and_action(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    views = {}
    for i in range(24):
        y = {"verb": i % 4, "noun": i % 3}
        z = {h: np.eye(n, dtype=np.float32)[y[h] if rng.random() < 0.7 else (y[h] + 1) % n] * 4
             for h, n in HEADS.items()}
        views[(f"v{i:02d}", 0)] = (z, y)
    res = head_metrics(merge_heads([views], "mean_softmax"), HEADS)
    run = tmp_path / "run"
    names = {"verb": ["take", "put", "open", "close"], "noun": ["plate", "cup", "knife"]}
    save_report(res, run / "test", names)
    metrics = json.loads((run / "test" / "metrics.json").read_text())
    assert metrics["top1"] == pytest.approx(res.top1) and set(metrics["heads"]) == {"verb", "noun"}
    for h in HEADS:
        assert (run / "test" / h / "confusion.png").exists()
        assert (run / "test" / h / "per_class.csv").read_text().count("\n") == HEADS[h] + 1
    actions = (run / "test" / "actions.csv").read_text().splitlines()
    assert actions[0] == "action,verb_class,noun_class,verb,noun,videos,accuracy"
    assert "1001,1,1,put,cup" in "\n".join(actions) and len(actions) == 1 + 12
    cfg = TrainConfig(dataset="ek100", train_split="train", val_split="val")
    cfg.model.name = "bcast_compo_test"
    from tstl.core.config import dump_yaml

    dump_yaml(cfg, run / "config.yaml")
    text = write_report(run)
    assert "| metric | verb | noun | action |" in text
    verb, noun = res.heads["verb"].top1, res.heads["noun"].top1
    assert f"| top-1 | {verb:.4f} | {noun:.4f} | {res.top1:.4f} |" in text
    assert "| chance | 0.2500 (1 / 4) | 0.3333 (1 / 3) | 0.0833 (1 / 12) |" in text
    assert "## Verb" in text and "## Noun" in text
    assert "![noun confusion](test/noun/confusion.png)" in text


def _multi_head_set(folder: Path) -> None:
    """A shards.json with heads over one tar of four samples whose video parts are empty: what the
    loader and TSTL read before any decode."""
    from shard_tools.tario import write_tar

    folder.mkdir(parents=True)
    labels = json.dumps({fmt.LABELS: {"verb": 0, "noun": 1}}).encode()
    samples = [(f"P01_01_{i}", {"cls": b"0", "json": labels, "mp4": b""}) for i in range(4)]
    size, sha = write_tar(folder / "shard-000000.tar", samples)
    info = fmt.ShardInfo("shard-000000.tar", 4, size, sha, {0: 4}, head_hist={"verb": {0: 4},
                                                                                "noun": {1: 4}})
    fmt.save(folder, fmt.ShardSet("ek100", folder.name, ["take", "put"], [info],
                                  heads={"verb": ["take", "put"], "noun": ["plate", "cup"]}))


def test_tstl_refuses_a_multi_head_set(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tstl.twostage.cli import main

    for split in ("train", "val"):
        _multi_head_set(tmp_path / "ek100" / "shards" / split)
    loaded = fmt.load(tmp_path / "ek100" / "shards" / "train")
    assert loaded.heads["noun"] == ["plate", "cup"] and loaded.head_hist() == {"verb": {0: 4},
                                                                                "noun": {1: 4}}
    root = Path(__file__).resolve().parents[2]
    code = main(["train", "--check", "--config", str(root / "configs/data/ek100.yaml"),
                 str(root / "configs/model/bcast_compo_vit_b16.yaml"),
                 str(root / "configs/tstl/default.yaml"), f"data_dir={tmp_path}",
                 f"out_dir={tmp_path / 'run'}", "tstl.init=[/nowhere.pth]"])
    err = capsys.readouterr().err
    assert code == 2 and "TSTL groups the classes of one label" in err and "verb, noun" in err
    assert "make train DATASET=ek100" in err
