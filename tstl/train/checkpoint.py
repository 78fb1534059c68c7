"""Checkpoints through DeepSpeed, plus per-rank loader/RNG state, completion markers, rotation and best.

Layout under ``<run>/checkpoints/``: one folder per tag (``step-000123``) holding DeepSpeed's files,
``rank-<r>.pt`` (this rank's loader position and RNG states) and, written last, ``complete.json``. A tag without
``complete.json`` is a save that crashed and is ignored; the previous complete one stays usable. Resume picks the
complete tag with the highest step. Rotation keeps the last ``keep_last`` complete tags and the best one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from tstl.train import dist

logger = logging.getLogger(__name__)

MARKER = "complete.json"


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    def __init__(self, run_dir: Path, keep_last: int = 2) -> None:
        self.dir = run_dir / "checkpoints"
        self.keep_last = max(1, keep_last)

    def complete(self) -> list[tuple[int, str, dict]]:
        """(step, tag, marker) of every complete checkpoint, oldest first."""
        found = []
        for marker in self.dir.glob(f"*/{MARKER}"):
            try:
                info = json.loads(marker.read_text())
            except json.JSONDecodeError:
                continue
            found.append((info["step"], marker.parent.name, info))
        return sorted(found)

    def save(self, engine, step: int, epoch: int, client_state: dict, rank_state: dict,
             metric: float | None = None) -> str:
        """Collective: every rank calls it. Returns the tag."""
        tag = f"step-{step:07d}"
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        tmp = self.dir / tag / f".rank-{dist.rank()}.pt.tmp"
        torch.save(rank_state, tmp)
        os.replace(tmp, self.dir / tag / f"rank-{dist.rank()}.pt")
        dist.barrier()  # every rank's files are on disk before the marker says so
        if dist.is_main():
            marker = {"step": step, "epoch": epoch, "metric": metric, "world_size": dist.world()}
            tmp = self.dir / tag / f".{MARKER}.tmp"
            tmp.write_text(json.dumps(marker))
            os.replace(tmp, self.dir / tag / MARKER)
            self._rotate()
        dist.barrier()
        logger.info("saved checkpoint %s", self.dir / tag)
        return tag

    def _rotate(self) -> None:
        done = self.complete()
        scored = [(info["metric"], step, tag) for step, tag, info in done if info.get("metric") is not None]
        keep = {tag for _, tag, _ in done[-self.keep_last:]}
        if scored:
            keep.add(max(scored)[2])
        for _, tag, _ in done:
            if tag not in keep:
                shutil.rmtree(self.dir / tag, ignore_errors=True)
        for d in self.dir.iterdir():  # incomplete saves older than the newest complete one
            if d.is_dir() and not (d / MARKER).exists() and done and d.name < done[-1][1]:
                shutil.rmtree(d, ignore_errors=True)

    def best(self) -> str | None:
        scored = [(info["metric"], step, tag) for step, tag, info in self.complete() if info.get("metric") is not None]
        return str(self.dir / max(scored)[2]) if scored else None

    def load_latest(self, engine) -> tuple[dict, dict] | None:
        """Load the newest complete checkpoint into ``engine``: (client_state, this rank's state), or None."""
        done = self.complete()
        if not done:
            return None
        step, tag, info = done[-1]
        if info["world_size"] != dist.world():
            raise RuntimeError(f"{self.dir / tag} was saved by {info['world_size']} ranks, this run has "
                               f"{dist.world()}; resume with the same number of processes")
        _, client = engine.load_checkpoint(str(self.dir), tag=tag)
        rank_state = torch.load(self.dir / tag / f"rank-{dist.rank()}.pt", weights_only=False)
        logger.info("resumed from %s (step %d)", self.dir / tag, step)
        return client, rank_state


def resolve_weights(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """A checkpoint file, a DeepSpeed tag folder or a run folder -> (weights file, the run's config.yaml if any).

    A run folder resolves to its best complete checkpoint (by validation metric), else its newest one.
    """
    path = Path(path)
    if path.is_dir() and (path / "checkpoints").is_dir():
        ck = Checkpointer(path)
        done = ck.complete()
        best = ck.best() or (str(ck.dir / done[-1][1]) if done else None)
        if best is None:
            raise FileNotFoundError(f"{path} has no complete checkpoint")
        return resolve_weights(best)
    if path.is_dir():
        files = sorted(path.glob("*model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{path}: no mp_rank_00_model_states.pt inside (is it a DeepSpeed tag folder?)")
        run_cfg = path.parent.parent / "config.yaml"
        return files[0], run_cfg if run_cfg.exists() else None
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path, None
