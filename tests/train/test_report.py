"""Report files a person reads (issue 14): capped confusion PNGs, the most confused pairs by name,
the curves PNG, the throughput/MFU section, a torn metrics.jsonl; progress bars and log lines; the
FLOP counting behind MFU."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tstl.core.config import dump_yaml, load_config
from tstl.core.log import init_logging
from tstl.train import perf, plots
from tstl.train.config import TrainConfig
from tstl.train.evaluate import EvalResult, metrics, progress, save_report
from tstl.train.report import WORST_CLASSES, write_report

ROOT = Path(__file__).resolve().parents[2]


def _result(confusion: np.ndarray) -> EvalResult:
    """An EvalResult with exactly ``confusion`` (one video per counted cell)."""
    n = confusion.shape[0]
    probs, labels = {}, {}
    for (t, p), c in np.ndenumerate(confusion):
        for k in range(int(c)):
            key = f"v{t}-{p}-{k}"
            probs[key] = np.eye(n, dtype=np.float32)[p] * 0.9 + 0.1 / n
            labels[key] = t
    res = metrics(probs, labels, n)
    assert (res.confusion == confusion).all()
    return res


def _crafted(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = np.diag(rng.integers(3, 9, n))
    c[rng.integers(0, n, n), rng.integers(0, n, n)] += 1  # background noise of single confusions
    c[np.arange(n), np.arange(n)] = np.diag(c).clip(min=3)
    for t, p, k in ((5, 9, 7), (17, 3, 6), (40, 41, 5)):
        # the real top off-diagonal cells, larger than the noise
        if max(t, p) < n:
            c[t, p] = k
    return c


NAMES = [f"class_{i}_doing_something" for i in range(174)]


def test_most_confused_pairs_are_the_top_off_diagonal_cells() -> None:
    c = _crafted(174)
    pairs = plots.most_confused_pairs(c, 3)
    assert [(p.true, p.predicted, p.count) for p in pairs] == [(5, 9, 7), (17, 3, 6), (40, 41, 5)]
    assert pairs[0].share == pytest.approx(7 / c[5].sum())
    off = c.copy()
    np.fill_diagonal(off, 0)
    assert all(p.true != p.predicted for p in plots.most_confused_pairs(c, 50))
    assert [p.count for p in plots.most_confused_pairs(c, 50)] == sorted(off.ravel())[::-1][:50]
    table = plots.pairs_table(pairs, NAMES)
    assert "| class_5_doing_something | class_9_doing_something | 7 |" in table[2]
    assert plots.pairs_table([], NAMES) == ["No video was confused with another class."]


@pytest.mark.parametrize("n", [8, 174])
def test_confusion_png_is_capped_and_named(tmp_path: Path, n: int) -> None:
    save_report(_result(_crafted(n)), tmp_path, NAMES[:n])
    with Image.open(tmp_path / "confusion.png") as im:
        assert max(im.size) <= plots.MAX_SIDE_PX, im.size
    for name in ("metrics.json", "per_class.csv", "confusion.npy", "confusion.csv",
                 "predictions.npz"):
        assert (tmp_path / name).exists()
    assert np.load(tmp_path / "confusion.npy").shape == (n, n)


def test_cluster_order_puts_confused_classes_together() -> None:
    c = np.diag([10] * 6)
    c[0, 4] = c[4, 0] = 5  # 0 <-> 4 and 1 <-> 5 are confused
    c[1, 5] = 6
    order = list(plots.cluster_order(c))
    assert sorted(order) == list(range(6))
    assert abs(order.index(0) - order.index(4)) == 1 and abs(order.index(1) - order.index(5)) == 1


def _run_dir(tmp_path: Path, n: int) -> Path:
    run = tmp_path / "run"
    cfg = load_config(TrainConfig,
                      [ROOT / "configs/data/ssv2.yaml", ROOT / "configs/model/bcast_vit_b16.yaml"],
                      [f"out_dir={run}", "epochs=3"])
    run.mkdir()
    dump_yaml(cfg, run / "config.yaml")
    save_report(_result(_crafted(n)), run / "test", NAMES[:n])
    (run / "perf.json").write_text(json.dumps({"forward_flops_per_clip": 1e9,
                                               "train_flops_per_clip": 3e9, "peak_flops": 989e12,
                                               "device": "NVIDIA H200", "precision": "bf16"}))
    rows = []
    for s in range(10, 60, 10):
        rows.append({"step": s, "epoch": s // 20, "train/loss": 5 - s / 20,
                     "train/lr": 1e-3 * s / 50, "train/clips_per_s": 100.0 + s,
                     "perf/achieved_flops": 3e14, "perf/mfu": 3e14 / 989e12})
        if s % 20 == 0:
            rows.append({"step": s, "epoch": s // 20, "val/top1": s / 100, "val/top5": s / 50})
    text = "\n".join(json.dumps(r) for r in rows) + '\n{"step": 60, "train/lo'  # torn by a kill
    (run / "metrics.jsonl").write_text(text)
    return run


def test_report_of_174_classes(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, 174)
    text = write_report(run)
    assert (run / "report.md").read_text() == text
    with Image.open(run / "curves.png") as im:
        assert im.size[0] > 100
    assert "![curves](curves.png)" in text and "![confusion](test/confusion.png)" in text
    pairs = text.split("## Most confused pairs")[1].split("##")[0]
    assert "| class_5_doing_something | class_9_doing_something | 7 |" in pairs
    assert "| class_17_doing_something | class_3_doing_something | 6 |" in pairs
    per_class = text.split("## Per class")[1].split("##")[0]
    assert "[test/per_class.csv](test/per_class.csv)" in per_class
    # the worst ones only, not 174 rows
    assert per_class.count("_doing_something |") == WORST_CLASSES
    assert "MFU 30.3% of the 989 TFLOP/s dense bf16 peak of NVIDIA H200" in text
    assert "3 GFLOP; achieved 300 TFLOP/s per NVIDIA H200" in text
    assert "chance (1 / 174 classes)" in text


def test_report_of_few_classes_lists_every_class_without_metrics(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, 8)
    # only a torn line: no curves, no throughput
    (run / "metrics.jsonl").write_text('{"step": 1, "train/lo')
    text = write_report(run)
    assert not (run / "curves.png").exists() and "## Throughput" not in text
    per_class = text.split("## Per class")[1].split("##")[0]
    assert all(f"| {name} |" in per_class for name in NAMES[:8])


def test_plot_curves_reads_a_torn_metrics_file(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0, "train/lr": 0.1}\n'
                                            '{"step": 2, "train/loss": 1.5, "train/lr": 0.2, '
                                            '"val/top1": 0.5}\n{"st')
    assert (plots.plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
            == tmp_path / "curves.png")
    assert len(plots.read_metrics(tmp_path / "metrics.jsonl")) == 2
    assert plots.plot_curves(tmp_path / "missing.jsonl", tmp_path / "none.png") is None


# ----------------------------------------------------------------------------------- progress, logs

def test_progress_bar_counts_this_ranks_batches() -> None:
    batches = [{"k": i} for i in range(7)]
    bar = progress(batches, "validate")
    assert bar.total == 7 and list(bar) == batches


def test_log_lines_do_not_break_a_progress_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    from tqdm import tqdm

    buf = io.StringIO()
    monkeypatch.setattr("sys.stderr", buf)
    init_logging()
    try:
        bar = tqdm(total=4, file=buf, desc="epoch 0", ascii=True)
        bar.update(1)
        logging.getLogger("tstl.test").info("a log line")
        bar.update(1)
        bar.close()
    finally:
        logging.getLogger().handlers.clear()
    lines = [seg for seg in buf.getvalue().replace("\r", "\n").split("\n") if "a log line" in seg]
    assert (len(lines) == 1 and "epoch 0" not in lines[0]
            and lines[0].endswith("INFO tstl.test: a log line"))


# ------------------------------------------------------------------------------------ FLOPs and MFU

class TwoLayers(nn.Module):
    """x -> a (8 -> 16) -> b (16 -> 4), no biases: forward 2 x (8x16 + 16x4) = 384 FLOPs per
    clip."""

    def __init__(self, train_a: bool, train_b: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16, bias=False), nn.Linear(16, 4, bias=False)
        self.a.weight.requires_grad, self.b.weight.requires_grad = train_a, train_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x.flatten(1)))


@pytest.mark.parametrize("train_a,train_b,backward", [
    # b: weight + input gradient; a: weight gradient only
    (True, True, 2 * 16 * 4 + 2 * 16 * 4 + 2 * 8 * 16),
    # frozen a below: b's weight gradient only (no input gradients at all)
    (False, True, 2 * 16 * 4),
    # frozen b above a trainable a: b's input gradient + a's weights
    (True, False, 2 * 16 * 4 + 2 * 8 * 16),
    (False, False, 0),  # nothing trains
])
def test_training_flops_follow_what_autograd_runs(train_a: bool, train_b: bool,
                                                  backward: int) -> None:
    from tstl.models.flops import count_flops

    fwd, total = count_flops(TwoLayers(train_a, train_b), (8,), train=True)
    assert fwd == 384 and total == 384 + backward
    meta = perf.count_on_meta(lambda: TwoLayers(train_a, train_b), (8,))
    assert meta == (fwd, total)


def test_fully_trainable_video_model_is_about_three_forwards() -> None:
    from tstl.models import create_model

    fwd, total = perf.count_on_meta(lambda: create_model("timesformer_test", num_classes=5),
                                    (3, 4, 32, 32)) or (0, 0)
    assert fwd > 0 and 2.5 < total / fwd <= 3.0


def test_peak_and_mfu_lookup() -> None:
    assert perf.peak_flops("NVIDIA H200", "bf16") == 989e12
    assert perf.peak_flops("NVIDIA H100 PCIe", "fp16") == 756e12
    assert perf.peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert perf.peak_flops("NVIDIA RTX A6000", "bf16") == pytest.approx(154.8e12)
    assert perf.peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert perf.peak_flops("NVIDIA H200", "fp32") is None and perf.peak_flops("CPU", "bf16") is None
    assert perf.peak_flops("Some Future GPU", "bf16") is None


def test_tstl_routed_report_names_the_confused_pairs(tmp_path: Path) -> None:
    from tstl.twostage.evaluate import write_report as write_routed

    hard, base = _result(_crafted(174)), _result(_crafted(174, seed=1))
    sel = np.diag([50, 40])
    sel[0, 1] = 9
    selector = _result(sel)
    methods = {name: {**r.summary(), "forwards_per_view": cost} for name, r, cost in
               (("hard", hard, 2.0), ("baseline", base, 1.0))}
    summary = {"videos": hard.videos, "views": hard.videos, "num_groups": 2, "soft_top_k": 2,
               "selector_acc": 0.9, "methods": methods, "forwards": {"hard_routed": [60, 39]},
               "experts": [{"group": 0, "classes": list(range(87)), "videos": 500, "accuracy": 0.8},
                           {"group": 1, "classes": list(range(87, 174)), "videos": 600,
                            "accuracy": None}]}
    text = write_routed({"summary": summary, "results": {"hard": hard, "baseline": base},
                         "selector": selector}, tmp_path, NAMES, "TSTL routed evaluation: test")
    hard_pairs = text.split("## Most confused pairs: TSTL, hard routing")[1].split("##")[0]
    assert "| class_5_doing_something | class_9_doing_something | 7 |" in hard_pairs
    assert "## Most confused pairs: single B-CAST" in text
    assert "| group 0 | group 1 | 9 |" in text.split("## Most confused pairs: selector")[1]
    for method in ("hard", "baseline", "selector"):
        with Image.open(tmp_path / method / "confusion.png") as im:
            assert max(im.size) <= plots.MAX_SIDE_PX
