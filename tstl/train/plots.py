"""Figures and tables a person reads after a run: the confusion matrix, the most confused pairs,
training curves.

* ``plot_confusion``: row-normalised heatmap; class names on the axes when there are few classes (<=
  40), otherwise classes ordered so that confused ones sit together (by their most confused
  partner), the figure capped at ``MAX_SIDE_PX`` per side, and no tick labels (the pairs table
  names them).
* ``most_confused_pairs``: the off-diagonal cells with the largest counts, as (true, predicted,
  count, share of the true class) rows, for ``report.md``.
* ``plot_curves``: one PNG with training loss, learning rate and validation top-1 over steps, from
  ``metrics.jsonl``.

matplotlib is imported inside the functions (Agg backend), so importing this module costs nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_SIDE_PX = 2000
"""Largest side of the confusion PNG in pixels, whatever the number of classes."""
NAMED_CLASSES = 40
"""Up to this many classes the axes carry class names; beyond, the pairs table does."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def row_normalised(confusion: np.ndarray) -> np.ndarray:
    """Each true class's row as fractions of its videos (rows without videos stay 0)."""
    return confusion / np.maximum(confusion.sum(1, keepdims=True), 1)


def cluster_order(confusion: np.ndarray) -> np.ndarray:
    """A class order that puts each class next to the class it is most confused with (greedy chain).

    Starts from the class with the most off-diagonal mass and repeatedly appends the unplaced class
    most confused with the last placed one (in either direction); ties and unconfused classes fall
    back to label order.
    """
    n = confusion.shape[0]
    norm = row_normalised(confusion)
    sym = norm + norm.T
    np.fill_diagonal(sym, 0.0)
    left = np.ones(n, dtype=bool)
    placed: list[int] = []
    while left.any():
        row = np.where(left, sym[placed[-1]], -1.0) if placed else np.full(n, -1.0)
        if row.max() > 0:  # argmax takes the lowest label among ties
            nxt = int(np.argmax(row))
        else:  # chain ends: start the next one at the unplaced class with the most confusion left
            nxt = int(np.argmax(np.where(left, (sym * left).max(1), -1.0)))
        placed.append(nxt)
        left[nxt] = False
    return np.array(placed)


def plot_confusion(confusion: np.ndarray, names: list[str], path: Path) -> None:
    """Row-normalised confusion heatmap at ``path`` (see the module docstring for the
    layout rules)."""
    plt = _pyplot()
    n = len(names)
    named = n <= NAMED_CLASSES
    order = np.arange(n) if named else cluster_order(confusion)
    norm = row_normalised(confusion)[np.ix_(order, order)]
    dpi = 90
    side_in = min(max(5.0, n * 0.45), MAX_SIDE_PX / dpi)
    fig, ax = plt.subplots(figsize=(side_in, side_in * 0.9))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    if named:
        ax.set_xticks(range(n), [names[i][:28] for i in order], rotation=90, fontsize=7)
        ax.set_yticks(range(n), [names[i][:28] for i in order], fontsize=7)
        title = "confusion (row-normalised)"
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        title = (f"confusion of {n} classes (row-normalised; confused classes placed together; "
                 "see report.md)")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


@dataclass(frozen=True)
class ConfusedPair:
    """Videos of class ``true`` predicted as ``predicted``."""

    true: int
    predicted: int
    count: int
    share: float
    """``count`` over the videos of ``true``."""


def most_confused_pairs(confusion: np.ndarray, k: int = 15) -> list[ConfusedPair]:
    """The ``k`` off-diagonal cells with the most videos, largest first (ties: larger share, then
    label order)."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    support = confusion.sum(1)
    cells = [(int(off[i, j]), int(i), int(j)) for i, j in zip(*np.nonzero(off))]
    cells.sort(key=lambda c: (-c[0], -c[0] / max(support[c[1]], 1), c[1], c[2]))
    return [ConfusedPair(i, j, cnt, cnt / max(int(support[i]), 1)) for cnt, i, j in cells[:k]]


def pairs_table(pairs: list[ConfusedPair], names: list[str]) -> list[str]:
    """Markdown table rows of ``most_confused_pairs``."""
    if not pairs:
        return ["No video was confused with another class."]
    rows = ["| true class | predicted as | videos | share of the true class |", "|---|---|---|---|"]
    rows += [f"| {names[p.true]} | {names[p.predicted]} | {p.count} | {p.share:.1%} |"
             for p in pairs]
    return rows


def read_metrics(path: Path) -> list[dict]:
    """Rows of a ``metrics.jsonl`` (a torn last line, from a killed run, is skipped)."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_curves(metrics_jsonl: Path, path: Path) -> Path | None:
    """Training loss, learning rate and validation top-1 over optimizer steps in one PNG; None
    without data."""
    rows = read_metrics(metrics_jsonl) if metrics_jsonl.exists() else []
    series = {key: [(r["step"], r[key]) for r in rows if key in r]
              for key in ("train/loss", "train/lr", "val/top1")}
    if not series["train/loss"]:
        return None
    plt = _pyplot()
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(2, 1))
    ax_loss.plot(*zip(*series["train/loss"]), lw=1, label="train loss")
    ax_loss.set(ylabel="loss")
    ax_loss.grid(alpha=0.3)
    if series["val/top1"]:
        ax_acc = ax_loss.twinx()
        ax_acc.plot(*zip(*series["val/top1"]), "o-", color="tab:orange",
                    label="val top-1 (single view)")
        ax_acc.set(ylabel="top-1", ylim=(0, 1))
        ax_acc.legend(loc="upper right")
    ax_loss.legend(loc="upper left")
    if series["train/lr"]:
        ax_lr.plot(*zip(*series["train/lr"]), color="tab:green", lw=1)
    ax_lr.set(xlabel="optimizer step", ylabel="learning rate")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
