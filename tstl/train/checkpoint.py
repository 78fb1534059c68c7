"""Checkpoints through DeepSpeed, plus per-rank loader/RNG state, completion markers, rotation and best.

Layout under ``<run>/checkpoints/``: one folder per tag (``step-000123``) holding DeepSpeed's files,
``rank-<r>.pt`` (this rank's loader position and RNG states) and, written last, ``complete.json``. A tag without
``complete.json`` is a save that crashed and is ignored; the previous complete one stays usable. Resume picks the
complete tag with the highest step. Rotation keeps the last ``keep_last`` complete tags and the best one.

Elastic resume (issue 13): a checkpoint saved by N ranks loads on M ranks. Every rank reads all N ``rank-<r>.pt``
files (the loader spreads the rest of the epoch over the new layout, ``ShardLoader.load_state_dicts``). Model and
optimizer: without partitioned optimizer state (ZeRO 0 in fp32/fp16) DeepSpeed's files load on any world size as
they are; with it (ZeRO 1/2: ``[bf16_]zero_pp_rank_<r>_..._optim_states.pt``, which DeepSpeed 0.19 refuses on another
world size) rank 0 first converts the tag once to
DeepSpeed's universal checkpoint (``deepspeed.checkpoint.ds_to_universal``, into ``universal/<tag>/``) and every
rank loads that with ``load_universal``; buffers and frozen weights come from the tag's model file.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from tstl.train import dist

logger = logging.getLogger(__name__)

MARKER = "complete.json"
UNIVERSAL = "universal"


class Resumed(NamedTuple):
    """What ``Checkpointer.load_latest`` restored besides the engine."""

    client: dict
    """The trainer's client state (step, epoch, ...)."""
    ranks: list[dict]
    """``rank-<r>.pt`` of every saved rank, by rank."""
    world_size: int
    """Ranks of the saved job."""


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
            if d.is_dir() and d.name != UNIVERSAL and not (d / MARKER).exists() and done and d.name < done[-1][1]:
                shutil.rmtree(d, ignore_errors=True)
        if (self.dir / UNIVERSAL).is_dir():  # conversions of tags that are gone
            for d in (self.dir / UNIVERSAL).iterdir():
                if d.name not in keep:
                    shutil.rmtree(d, ignore_errors=True)

    def best(self) -> str | None:
        scored = [(info["metric"], step, tag) for step, tag, info in self.complete() if info.get("metric") is not None]
        return str(self.dir / max(scored)[2]) if scored else None

    def load_latest(self, engine) -> Resumed | None:
        """Load the newest complete checkpoint into ``engine`` (on any world size); None when there is none."""
        done = self.complete()
        if not done:
            return None
        step, tag, info = done[-1]
        saved = int(info["world_size"])
        folder = self.dir / tag
        missing = [r for r in range(saved) if not (folder / f"rank-{r}.pt").is_file()]
        if missing:
            raise RuntimeError(f"{folder}: rank-<r>.pt of ranks {missing} missing (saved by {saved} ranks); "
                               "the checkpoint folder must be complete and shared by all nodes")
        if saved != dist.world() and partitioned(folder):
            client = _load_universal(engine, self._universal(tag), folder)
        else:
            _, client = engine.load_checkpoint(str(self.dir), tag=tag)
        if client is None:
            raise RuntimeError(f"DeepSpeed could not load {folder}")
        ranks = [torch.load(folder / f"rank-{r}.pt", weights_only=False) for r in range(saved)]
        logger.info("resumed from %s (step %d, saved by %d ranks, %d now)", folder, step, saved, dist.world())
        return Resumed(client, ranks, saved)

    def _universal(self, tag: str) -> Path:
        """Collective: rank 0 converts ``tag`` to a universal checkpoint once; returns its folder."""
        out = self.dir / UNIVERSAL / tag
        if dist.is_main() and not out.is_dir():
            tmp = self.dir / UNIVERSAL / f".{tag}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            # a child process: the converter runs its own worker pools and must not touch our process group;
            # --inject_missing_state adds the universal_checkpoint_info our (non-Megatron) models do not declare
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                   str(self.dir / tag), "--output_folder", str(tmp), "--num_extract_workers", "1",
                   "--num_merge_workers", "1", "--inject_missing_state"]
            logger.info("converting %s to a universal checkpoint for another world size", self.dir / tag)
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"converting {self.dir / tag} to a universal checkpoint failed:\n"
                                   f"{proc.stderr[-3000:]}")
            os.replace(tmp, out)
        dist.barrier()
        return out


def partitioned(folder: Path) -> bool:
    """Whether a DeepSpeed tag folder holds per-rank optimizer partitions (ZeRO 1/2, bf16)."""
    return any(folder.glob("*zero_pp_rank_*optim_states.pt"))


def _load_universal(engine, folder: Path, original: Path) -> dict:
    """Load a universal checkpoint into ``engine``; returns the client state."""
    # DeepSpeed reads this flag only while loading; the engine was built before we knew the world size differs
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        _, client = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    finally:
        config.load_universal_checkpoint = before
    # the universal format holds the optimizer's parameters only: buffers and frozen weights from the model file
    module = torch.load(next(original.glob("*model_states.pt")), map_location="cpu", weights_only=False)["module"]
    engine.module.load_state_dict(module, strict=True)
    return client


def resolve_weights(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """A checkpoint file, a DeepSpeed tag folder, a Hugging Face model folder or a run folder ->
    (weights file or Hugging Face folder, the run's config.yaml if any).

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
    from tstl.models.checkpoint import hf_folder

    if hf := hf_folder(path):  # a Hugging Face folder (save_pretrained or hub cache): the weights
        return hf, None
    if path.is_dir():
        files = sorted(path.glob("*model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{path}: no mp_rank_00_model_states.pt inside (is it a DeepSpeed tag folder?)")
        run_cfg = path.parent.parent / "config.yaml"
        return files[0], run_cfg if run_cfg.exists() else None
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path, None
