"""Summaries of a shard set: class balance (per head of a multi-head set), durations, frames and
sizes, as text and as a PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shard_tools.tario import iter_samples
from tstl.core import shards
from tstl.core.shards import JSON, LABELS, MP4


def collect(shard_dir: Path) -> dict[str, np.ndarray]:
    """Per-sample label, duration, frames, fps and mp4 size from the shards' json parts; a
    multi-head set adds ``label/<head>`` for each head."""
    ss = shards.load(shard_dir)
    cols: dict[str, list] = {"label": [], "duration": [], "frames": [], "fps": [], "bytes": [],
                             **{f"label/{h}": [] for h in ss.heads}}
    for info in ss.shards:
        for _, parts in iter_samples(shard_dir / info.name):
            meta = json.loads(parts[JSON])
            for k in ("label", "duration", "frames", "fps"):
                cols[k].append(meta[k])
            for h in ss.heads:
                cols[f"label/{h}"].append(meta[LABELS][h])
            cols["bytes"].append(len(parts[MP4]))
    return {k: np.asarray(v) for k, v in cols.items()}


def _describe(name: str, x: np.ndarray, unit: str = "") -> str:
    if x.size == 0:
        return f"{name:<10} (none)"
    q = np.percentile(x, [0, 5, 50, 95, 100])
    return f"{name:<10} mean {x.mean():10.2f}{unit}  min {q[0]:.2f}  p5 {q[1]:.2f}  " \
           f"median {q[2]:.2f}  p95 {q[3]:.2f}  max {q[4]:.2f}"


def _balance(title: str, labels: np.ndarray, names: list[str]) -> tuple[list[str], np.ndarray]:
    """The class-balance lines of one label column (``title``: "classes" or "<head> classes")."""
    counts = np.bincount(labels, minlength=len(names) or None) if labels.size else np.zeros(0, int)
    if not counts.size:
        return [f"{title:<10} (none)"], counts
    lines = [f"{title:<10} {int((counts > 0).sum())} present; per class min {counts.min()}, max "
             f"{counts.max()}, imbalance {counts.max() / max(counts.min(), 1):.2f}x"]
    for c, n in enumerate(counts):
        lines.append(f"  {c:4d} {n:7d}  {names[c] if c < len(names) else str(c)}")
    return lines, counts


def report(shard_dir: Path, png: Path | None = None) -> str:
    """Text summary (the class balance of each head of a multi-head set); also a 2x2 PNG of the
    distributions when ``png`` is given."""
    ss = shards.load(shard_dir)
    data = collect(shard_dir)
    lines = [f"{shard_dir}: {ss.dataset}/{ss.split}, {ss.num_samples} samples in {len(ss.shards)} "
             f"shards, {sum(s.bytes for s in ss.shards) / 2**20:.1f} MiB, "
             f"{len(ss.missing)} left out",
             _describe("duration", data["duration"], " s"), _describe("frames", data["frames"]),
             _describe("fps", data["fps"]), _describe("size", data["bytes"] / 1024, " KiB")]
    tables = [(f"{h} classes", data[f"label/{h}"], names) for h, names in ss.heads.items()]
    counts = np.zeros(0, int)
    for title, labels, names in tables or [("classes", data["label"], ss.classes)]:
        text, hist = _balance(title, labels, names)
        lines += text
        counts = hist if not counts.size else counts  # the plot shows the first head's
    if png is not None:
        _plot(png, data, counts, f"{ss.dataset}/{ss.split}")
    return "\n".join(lines)


def _plot(png: Path, data: dict[str, np.ndarray], counts: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(10, 7))
    ax[0, 0].bar(np.arange(len(counts)), counts)
    ax[0, 0].set(title="videos per class", xlabel="class")
    ax[0, 1].hist(data["duration"], bins=30)
    ax[0, 1].set(title="duration", xlabel="seconds")
    ax[1, 0].hist(data["frames"], bins=30)
    ax[1, 0].set(title="frames per video", xlabel="frames")
    ax[1, 1].hist(data["bytes"] / 1024, bins=30)
    ax[1, 1].set(title="mp4 size", xlabel="KiB")
    fig.suptitle(title)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)
    plt.close(fig)
