"""Data-wait fraction of a short CPU training run through the real trainer, with 1 and 2 loader
workers.

The trainer logs ``train/data_wait``: the share of the epoch's wall time spent waiting for the next
batch (time in ``next(loader)``) rather than in the forward/backward/step. A run trains a small
B-CAST (2 blocks, width 192, 8 frames at 112 px) on SSV2-like clips from ``benchmarks.loader`` for
one epoch, once with 1 and once with 2 workers, in the same invocation.

Run: ``python -m benchmarks.data_wait --out docs/benchmarks.md [--videos 48]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.loader import make_videos, write_shards
from benchmarks.report import update_section
from tstl.core.config import load_config
from tstl.core.log import init_logging
from tstl.train.config import TrainConfig
from tstl.train.trainer import Trainer

logger = logging.getLogger(__name__)

MODEL = {"name": "bcast_vit_b16", "freeze_pretrained": False,
         "kwargs": {"depth": 2, "embed_dim": 192, "num_heads": 3, "img_size": 112, "num_frames": 8}}


def train_once(data_dir: Path, out: Path, workers: int, log_every: int) -> dict[str, float]:
    """One epoch through ``Trainer``; returns the last logged data-wait fraction and clips/s."""
    overrides = {
        "dataset": "bench", "data_dir": str(data_dir), "train_split": "train", "val_split": "train",
        "out_dir": str(out), "epochs": 1, "val_every": 0, "test_at_end": False,
        "log_every": log_every, "model": MODEL, "engine": {"precision": "fp32"},
        "optim": {"layer_decay": 1.0, "warmup_epochs": 0.0},
        "data": {"num_frames": 8, "input_size": 112, "sampling": "segment", "batch_size": 4,
                 "num_workers": workers, "mixup": 0.8, "cutmix": 1.0, "augment_on": "worker"},
    }
    cfg = load_config(TrainConfig, [], [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    try:
        trainer.train()
    finally:
        trainer.close()
    seconds = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    last = [r for r in rows if "train/data_wait" in r][-1]
    return {"data_wait": last["train/data_wait"], "clips_per_s": last["train/clips_per_s"],
            "seconds": seconds}


def run(num_videos: int) -> str:
    """Both runs on the same shards; returns the markdown section."""
    torch.set_num_threads(1)  # one core for the model, the other for the workers (a 2-core machine)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_videos(Path(tmp) / "videos", num_videos)
        write_shards(paths, Path(tmp) / "bench" / "shards" / "train")
        steps = num_videos // 4
        for workers in (1, 2):
            results[workers] = train_once(Path(tmp), Path(tmp) / f"run-{workers}", workers,
                                          max(1, steps))
    rows = "\n".join(f"| {w} | {r['data_wait']:.0%} | {r['clips_per_s']:.1f} | {r['seconds']:.0f} |"
                     for w, r in results.items())
    return f"""## Data wait in training (`python -m benchmarks.data_wait --videos {num_videos}`)

One epoch ({num_videos} SSV2-like clips, batch 4, {num_videos // 4} steps) of a small B-CAST (2
blocks, width 192, 8 frames at 112 px, every parameter trained, fp32, one CPU thread) through
`Trainer` with the shard loader (`augment_on: worker`, RandAugment, mixup); `data wait` is the
trainer's own `train/data_wait` (time waiting for the next batch over the epoch's wall time), from
the same invocation for both rows.

| loader workers | data wait | clips/s (last step) | epoch seconds |
|---|---|---|---|
{rows}

Reading: the model step runs on one thread and the workers on the remaining core(s) of this machine;
more workers help only where there are cores for them. On a GPU node the model step leaves the CPU
cores to the workers, and `augment_on: device` (the default on CUDA) takes RandAugment off them.
"""


def main(argv: list[str] | None = None) -> None:
    """CLI: run the data-wait benchmark and write its section of the report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/benchmarks.md",
                    help="report file whose 'data-wait' section is replaced")
    ap.add_argument("--videos", type=int, default=48,
                    help="number of clips in the epoch (size knob)")
    args = ap.parse_args(argv)
    init_logging()
    md = run(args.videos)
    update_section(args.out, "data-wait", md)
    print(md)


if __name__ == "__main__":
    main()
