"""A markdown report of a finished run: test accuracy against chance, throughput and MFU, the most
confused pairs, the worst classes, one PNG of loss/lr/validation top-1 and the confusion matrix.

Everything is read back from the run folder (``config.yaml``, ``metrics.jsonl``, ``test/``), so
``python -m tstl.train.cli report <run>`` rewrites it at any time; a torn last line of
``metrics.jsonl`` (a killed run) is skipped. A multi-head run (EPIC-KITCHENS: verb, noun) reports
each head and the action (both right).
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
"""Up to this many classes report.md lists every class; beyond, the ``WORST_CLASSES`` worst and a
link to the CSV."""
WORST_CLASSES = 15
CONFUSED_PAIRS = 15


def read_per_class(path: Path) -> list[dict]:
    """Rows of ``per_class.csv``: label, class, videos, accuracy (None where the class has
    no video)."""
    with open(path, newline="") as f:
        return [{"label": int(r["label"]), "class": r["class"], "videos": int(r["videos"]),
                 "accuracy": float(r["accuracy"]) if r["accuracy"] else None}
                for r in csv.DictReader(f)]


def per_class_table(rows: list[dict], link: str) -> list[str]:
    """Every class by label when there are few; otherwise the worst ones (lowest accuracy, then
    most videos)."""
    head = ["| label | class | videos | accuracy |", "|---|---|---|---|"]
    fmt = lambda r: f"| {r['label']} | {r['class']} | {r['videos']} | "  # noqa: E731
    acc = lambda r: "n/a" if r["accuracy"] is None else f"{r['accuracy']:.4f}"  # noqa: E731
    if len(rows) <= FULL_TABLE_CLASSES:
        return head + [fmt(r) + acc(r) + " |" for r in rows]
    seen = sorted((r for r in rows if r["accuracy"] is not None),
                  key=lambda r: (r["accuracy"], -r["videos"], r["label"]))
    return [f"The {min(WORST_CLASSES, len(seen))} classes with the lowest accuracy of {len(rows)}; "
            f"every class is in [{link}]({link}).", "", *head,
            *[fmt(r) + acc(r) + " |" for r in seen[:WORST_CLASSES]]]


def flops_text(flops: float, suffix: str = "") -> str:
    """``3.2e14`` -> ``"320 TFLOP"`` (the largest unit that keeps the number >= 1)."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}FLOP{suffix}"
    return f"{flops:.3g} FLOP{suffix}"


def throughput_lines(rows: list[dict], info: dict | None) -> list[str]:
    """Median training throughput, achieved FLOP/s and MFU over the run's logged steps (``perf/*``
    scalars); ``info`` is the run's ``perf.json`` (model FLOPs per clip, device, peak)."""
    clips = [r["train/clips_per_s"] for r in rows if "train/clips_per_s" in r]
    flops = [r["perf/achieved_flops"] for r in rows if "perf/achieved_flops" in r]
    mfu = [r["perf/mfu"] for r in rows if "perf/mfu" in r]
    if not clips:
        return []
    lines = [f"Training throughput (median of the logged steps): {statistics.median(clips):.1f} "
             "clips/s over all ranks."]
    if info and flops:
        lines.append(f"Model FLOPs per training clip (forward + backward, counted): "
                     f"{flops_text(info['train_flops_per_clip'])}; achieved "
                     f"{flops_text(statistics.median(flops), '/s')} per {info['device']}.")
        if mfu and info.get("peak_flops"):
            lines.append(f"MFU {statistics.median(mfu):.1%} of the "
                         f"{flops_text(info['peak_flops'], '/s')} dense {info['precision']} peak "
                         f"of {info['device']}.")
        else:
            lines.append("MFU: not computed (no known peak for this device and precision; see "
                         "docs/training.md).")
    return ["## Throughput", "", " ".join(lines), ""]


def write_report(run_dir: Path) -> str:
    """Write ``<run>/report.md`` (and ``curves.png``) and return the text; a multi-head run's shows
    each head and the action (``head_sections``)."""
    run_dir = Path(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    metrics = json.loads((run_dir / "test" / "metrics.json").read_text())
    rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    info = (json.loads((run_dir / "perf.json").read_text()) if (run_dir / "perf.json").exists()
            else None)
    curves = plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    views = cfg["data"]["test_views"]
    title = [f"# Run report: {cfg['model']['name']} on {cfg['dataset']} ({cfg['train_split']} -> "
             f"{cfg['val_split']})", "",
             f"Multi-view test ({views[0]} x {views[1]} views) on {metrics['videos']} videos:", ""]
    run = ["", f"{cfg['epochs']} epochs, batch {cfg['data']['batch_size']} per rank, "
               f"precision {cfg['engine']['precision']}.", "", *throughput_lines(rows, info)]
    plots = ["## Plots", ""]
    if curves:
        plots += ["Training loss, learning rate and single-view validation top-1:", "",
                  "![curves](curves.png)", ""]
    if "heads" in metrics:
        table, sections, images = head_sections(run_dir / "test", metrics)
    else:
        table, sections, images = _one_head(run_dir / "test", metrics)
    text = "\n".join(title + table + run + sections + plots + images) + "\n"
    (run_dir / "report.md").write_text(text)
    return text


def _class_sections(test: Path, level: str) -> tuple[list[str], list[str]]:
    """The most confused pairs and per-class table of one head's ``save_report`` folder ``test``
    (headings at ``level``), and its class names."""
    confusion = np.load(test / "confusion.npy")
    n = confusion.shape[0]
    per_class = read_per_class(test / "per_class.csv")
    names = [r["class"] for r in per_class] if len(per_class) == n else [str(i) for i in range(n)]
    link = "test/per_class.csv" if test.name == "test" else f"test/{test.name}/per_class.csv"
    pairs = pairs_table(most_confused_pairs(confusion, CONFUSED_PAIRS), names)
    return [f"{level} Most confused pairs", "", *pairs, "", f"{level} Per class", "",
            *per_class_table(per_class, link), ""], names


def _one_head(test: Path, metrics: dict) -> tuple[list[str], list[str], list[str]]:
    sections, names = _class_sections(test, "##")
    n = len(names)
    table = ["| metric | value |", "|---|---|",
             f"| top-1 | {metrics['top1']:.4f} |", f"| top-5 | {metrics['top5']:.4f} |",
             f"| mean class accuracy | {metrics['mean_class_acc']:.4f} |",
             f"| chance (1 / {n} classes) | {1 / n:.4f} |"]
    return table, sections, ["![confusion](test/confusion.png)"]


def head_sections(test: Path, metrics: dict) -> tuple[list[str], list[str], list[str]]:
    """A multi-head run (``evaluate.MultiHeadResult``): one table of each head's and the action's
    accuracy (action = every head right, CAST's EPIC-KITCHENS rule), each head's confused pairs and
    classes, its confusion image."""
    heads = metrics["heads"]
    sizes = {h: len(read_per_class(test / h / "per_class.csv")) for h in heads}
    actions = int(np.prod(list(sizes.values())))
    cols = [*heads, "action"]
    value = {**heads, "action": metrics}
    table = [f"| metric | {' | '.join(cols)} |", "|---|" + "---|" * len(cols)]
    rows = (("top1", "top-1"), ("top5", "top-5"), ("mean_class_acc", "mean class accuracy"))
    for key, label in rows:
        table.append(f"| {label} | " + " | ".join(f"{value[c][key]:.4f}" for c in cols) + " |")
    chance = [f"{1 / n:.4f} (1 / {n})" for n in [*sizes.values(), actions]]
    table += [f"| chance | {' | '.join(chance)} |", "",
              "Action: every head right (top-5: each head's label among its 5 most probable), as "
              "CAST reports EPIC-KITCHENS (its action id verb x 1000 + noun); its mean class "
              "accuracy is over the actions in the test set (test/actions.csv)."]
    sections, images = [], []
    for h in heads:
        lines, _ = _class_sections(test / h, "###")
        sections += [f"## {h.capitalize()}", "", *lines]
        images.append(f"![{h} confusion](test/{h}/confusion.png)")
    return table, sections, images
