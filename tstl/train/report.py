"""A markdown report of a finished run: test accuracy against chance, throughput and MFU, the most confused pairs,
the worst classes, one PNG of loss/lr/validation top-1 and the confusion matrix.

Everything is read back from the run folder (``config.yaml``, ``metrics.jsonl``, ``test/``), so ``python -m
tstl.train.cli report <run>`` rewrites it at any time; a torn last line of ``metrics.jsonl`` (a killed run) is
skipped.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import numpy as np
import yaml

from tstl.train.plots import most_confused_pairs, pairs_table, plot_curves, read_metrics

FULL_TABLE_CLASSES = 30
"""Up to this many classes report.md lists every class; beyond, the ``WORST_CLASSES`` worst and a link to the CSV."""
WORST_CLASSES = 15
CONFUSED_PAIRS = 15


def read_per_class(path: Path) -> list[dict]:
    """Rows of ``per_class.csv``: label, class, videos, accuracy (None where the class has no video)."""
    with open(path, newline="") as f:
        return [{"label": int(r["label"]), "class": r["class"], "videos": int(r["videos"]),
                 "accuracy": float(r["accuracy"]) if r["accuracy"] else None} for r in csv.DictReader(f)]


def per_class_table(rows: list[dict], link: str) -> list[str]:
    """Every class by label when there are few; otherwise the worst ones (lowest accuracy, then most videos)."""
    head = ["| label | class | videos | accuracy |", "|---|---|---|---|"]
    fmt = lambda r: f"| {r['label']} | {r['class']} | {r['videos']} | "  # noqa: E731
    acc = lambda r: "n/a" if r["accuracy"] is None else f"{r['accuracy']:.4f}"  # noqa: E731
    if len(rows) <= FULL_TABLE_CLASSES:
        return head + [fmt(r) + acc(r) + " |" for r in rows]
    seen = sorted((r for r in rows if r["accuracy"] is not None),
                  key=lambda r: (r["accuracy"], -r["videos"], r["label"]))
    return [f"The {min(WORST_CLASSES, len(seen))} classes with the lowest accuracy of {len(rows)}; every class is in "
            f"[{link}]({link}).", "", *head, *[fmt(r) + acc(r) + " |" for r in seen[:WORST_CLASSES]]]


def flops_text(flops: float, suffix: str = "") -> str:
    """``3.2e14`` -> ``"320 TFLOP"`` (the largest unit that keeps the number >= 1)."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}FLOP{suffix}"
    return f"{flops:.3g} FLOP{suffix}"


def throughput_lines(rows: list[dict], info: dict | None) -> list[str]:
    """Median training throughput, achieved FLOP/s and MFU over the run's logged steps (``perf/*`` scalars);
    ``info`` is the run's ``perf.json`` (model FLOPs per clip, device, peak)."""
    clips = [r["train/clips_per_s"] for r in rows if "train/clips_per_s" in r]
    flops = [r["perf/achieved_flops"] for r in rows if "perf/achieved_flops" in r]
    mfu = [r["perf/mfu"] for r in rows if "perf/mfu" in r]
    if not clips:
        return []
    lines = [f"Training throughput (median of the logged steps): {statistics.median(clips):.1f} clips/s over all "
             "ranks."]
    if info and flops:
        lines.append(f"Model FLOPs per training clip (forward + backward, counted): "
                     f"{flops_text(info['train_flops_per_clip'])}; achieved "
                     f"{flops_text(statistics.median(flops), '/s')} per {info['device']}.")
        if mfu and info.get("peak_flops"):
            lines.append(f"MFU {statistics.median(mfu):.1%} of the {flops_text(info['peak_flops'], '/s')} "
                         f"dense {info['precision']} peak of {info['device']}.")
        else:
            lines.append("MFU: not computed (no known peak for this device and precision; see docs/training.md).")
    return ["## Throughput", "", " ".join(lines), ""]


def write_report(run_dir: Path) -> str:
    """Write ``<run>/report.md`` (and ``curves.png``) and return the text."""
    run_dir = Path(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    metrics = json.loads((run_dir / "test" / "metrics.json").read_text())
    confusion = np.load(run_dir / "test" / "confusion.npy")
    n = confusion.shape[0]
    per_class = read_per_class(run_dir / "test" / "per_class.csv")
    names = [r["class"] for r in per_class] if len(per_class) == n else [str(i) for i in range(n)]
    rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    info = json.loads((run_dir / "perf.json").read_text()) if (run_dir / "perf.json").exists() else None
    curves = plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    lines = [
        f"# Run report: {cfg['model']['name']} on {cfg['dataset']} ({cfg['train_split']} -> {cfg['val_split']})", "",
        f"Multi-view test ({cfg['data']['test_views'][0]} x {cfg['data']['test_views'][1]} views) on "
        f"{metrics['videos']} videos:", "",
        "| metric | value |", "|---|---|",
        f"| top-1 | {metrics['top1']:.4f} |", f"| top-5 | {metrics['top5']:.4f} |",
        f"| mean class accuracy | {metrics['mean_class_acc']:.4f} |", f"| chance (1 / {n} classes) | {1 / n:.4f} |",
        "", f"{cfg['epochs']} epochs, batch {cfg['data']['batch_size']} per rank, "
            f"precision {cfg['engine']['precision']}.",
        "", *throughput_lines(rows, info),
        "## Most confused pairs", "", *pairs_table(most_confused_pairs(confusion, CONFUSED_PAIRS), names), "",
        "## Per class", "", *per_class_table(per_class, "test/per_class.csv"), "",
        "## Plots", "",
    ]
    if curves:
        lines += ["Training loss, learning rate and single-view validation top-1:", "", "![curves](curves.png)", ""]
    lines.append("![confusion](test/confusion.png)")
    text = "\n".join(lines) + "\n"
    (run_dir / "report.md").write_text(text)
    return text
