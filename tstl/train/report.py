"""A short markdown report of a finished run: test accuracy against chance, loss curve and confusion matrix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml


def _loss_curve(run_dir: Path) -> Path | None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    val = [(r["step"], r["val/top1"]) for r in rows if "val/top1" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss")
    ax.set(xlabel="step", ylabel="loss")
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val), "o-", color="tab:orange", label="val top-1")
        ax2.set(ylabel="top-1", ylim=(0, 1))
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    path = run_dir / "loss.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(run_dir: Path) -> str:
    """Write ``<run>/report.md`` and return its text."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    metrics = json.loads((run_dir / "test" / "metrics.json").read_text())
    confusion = np.load(run_dir / "test" / "confusion.npy")
    n = confusion.shape[0]
    curve = _loss_curve(run_dir)
    per_class = (run_dir / "test" / "per_class.csv").read_text().splitlines()
    lines = [
        f"# Run report: {cfg['model']['name']} on {cfg['dataset']} ({cfg['train_split']} -> {cfg['val_split']})", "",
        f"Multi-view test ({cfg['data']['test_views'][0]} x {cfg['data']['test_views'][1]} views) on "
        f"{metrics['videos']} videos:", "",
        "| metric | value |", "|---|---|",
        f"| top-1 | {metrics['top1']:.4f} |", f"| top-5 | {metrics['top5']:.4f} |",
        f"| mean class accuracy | {metrics['mean_class_acc']:.4f} |", f"| chance (1 / {n} classes) | {1 / n:.4f} |",
        "", f"{cfg['epochs']} epochs, batch {cfg['data']['batch_size']} per rank, precision {cfg['engine']['precision']}.",
        "", "## Per class", "", "| " + " | ".join(per_class[0].split(",")) + " |", "|---|---|---|---|",
        *["| " + " | ".join(row.split(",", 1)[0:1] + row.split(",", 1)[1].rsplit(",", 2)) + " |" for row in per_class[1:]],
        "", "## Plots", "", "![confusion](test/confusion.png)",
    ]
    if curve:
        lines.append("![loss](loss.png)")
    text = "\n".join(lines) + "\n"
    (run_dir / "report.md").write_text(text)
    return text
