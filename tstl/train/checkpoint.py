"""Checkpoints through DeepSpeed, plus per-rank loader/RNG state, completion markers, rotation and
best; and the policy of when to save (``Checkpointer.decide``, as torchtitan's
``CheckpointManager._should_save``).

Layout under ``<run>/checkpoints/``: one folder per tag (``step-000123``) holding DeepSpeed's files,
``rank-<r>.pt`` (this rank's loader position and RNG states) and, written last, ``complete.json``. A
tag without ``complete.json`` is a save that crashed and is ignored; the previous complete one stays
usable. Resume picks the complete tag with the highest step. Rotation keeps the last ``keep_last``
complete tags and the best one.

Durable and checked (issue 21): the files are fsynced before the marker, which lists each file's
size and SHA-256; a resume verifies the newest tag and moves a damaged one aside (``damaged-<tag>``,
kept, never resumed or rotated), falling back to the previous complete one with a warning;
``CheckpointError`` only when none is usable.

Elastic resume (issue 13): a checkpoint saved by N ranks loads on M ranks. Every rank reads all N
``rank-<r>.pt`` files (the loader spreads the rest of the epoch over the new layout,
``ShardLoader.load_state_dicts``). Model and optimizer: without partitioned optimizer state (ZeRO 0
in fp32/fp16) DeepSpeed's files load on any world size as they are; with it (ZeRO 1/2:
``[bf16_]zero_pp_rank_<r>_..._optim_states.pt``, which DeepSpeed 0.19 refuses on another world size)
rank 0 first converts the tag once to DeepSpeed's universal checkpoint
(``deepspeed.checkpoint.ds_to_universal``, into ``universal/<tag>/``) and every rank loads that with
``load_universal``; buffers and frozen weights come from the tag's model file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from tstl.core.durable import fsync_dir, write_text_durable
from tstl.train import dist
from tstl.train.config import CheckpointConfig
from tstl.train.preemption import PreemptionWatch

logger = logging.getLogger(__name__)

MARKER = "complete.json"
UNIVERSAL = "universal"
PREFIX = "step-"
FORMAT = 2
"""Marker format: 2 lists every file's size and SHA-256 (issue 21); a marker without ``files`` is
from before."""
_OWNED = re.compile(r"zero_pp_rank_(\d+)_|^rank-(\d+)\.pt$")


class CheckpointError(Exception):
    """No usable checkpoint although the run has some (all damaged), or one that cannot be loaded:
    the message names the folders, ``hint`` the fix (the CLI exits 2)."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(f"{message} ({hint})" if hint else message)
        self.hint = hint


class Resumed(NamedTuple):
    """What ``Checkpointer.load_latest`` restored besides the engine."""

    client: dict
    """The trainer's client state (step, epoch, ...)."""
    ranks: list[dict]
    """``rank-<r>.pt`` of every saved rank, by rank."""
    world_size: int
    """Ranks of the saved job."""


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Decision(NamedTuple):
    """What ``Checkpointer.decide`` tells the trainer at a safe point."""

    save: bool
    stop: bool
    """A signal asked the run to stop (after the save)."""


class Checkpointer:
    """Owns the run's checkpoints: when to save (``decide``), how (``save``: durable, checked),
    what to resume (``load_latest``).

    Args:
        run_dir: the run folder (checkpoints go to ``<run_dir>/checkpoints``).
        cfg: the cadence (``checkpoint.every_steps/every_epochs/every_minutes``) and the rotation
            (``keep_last``).
        watch: the signal flag polled with the wall clock (default: one never signalled).
        device: where the collective of ``decide`` runs (the process group's device).
    """

    def __init__(self, run_dir: Path, cfg: CheckpointConfig | None = None,
                 watch: PreemptionWatch | None = None, device: torch.device | None = None) -> None:
        self.dir = run_dir / "checkpoints"
        self.cfg = cfg or CheckpointConfig()
        self.keep_last = max(1, self.cfg.keep_last)
        self.watch = watch or PreemptionWatch()
        self.device = device or torch.device("cpu")
        self.last_save = time.monotonic()

    # --------------------------------------------------------------------------------------- policy

    def decide(self, step: int, *, epoch_end: int | None = None, last: bool = False) -> Decision:
        """Collective, at a safe point: save now? stop (a signal) after it? Every rank gets the same
        answer.

        After an optimizer step (``epoch_end`` None): every ``every_steps`` steps. At the end of
        epoch ``epoch_end`` (after its validation, so the checkpoint carries the metric): every
        ``every_epochs`` epochs and after the ``last``. Both: when ``every_minutes`` passed since
        the last save on rank 0's clock (one clock decides, so ranks whose clocks or speeds differ
        still save together) and on a signal. One all-reduce.
        """
        due = dist.is_main() and self.cfg.every_minutes > 0 and (
            time.monotonic() - self.last_save >= self.cfg.every_minutes * 60.0)
        stop, timed = self.watch.poll(self.device, due)
        if epoch_end is None:
            counted = bool(self.cfg.every_steps) and step % self.cfg.every_steps == 0
        else:
            counted = last or (epoch_end + 1) % self.cfg.every_epochs == 0
        return Decision(counted or timed or stop, stop)

    # ----------------------------------------------------------------------------------------- save

    def complete(self) -> list[tuple[int, str, dict]]:
        """(step, tag, marker) of every checkpoint with a readable completion marker, oldest
        first."""
        found = []
        for marker in self.dir.glob(f"{PREFIX}*/{MARKER}"):
            info = _read_marker(marker)
            if info is not None:
                found.append((info["step"], marker.parent.name, info))
        return sorted(found)

    def save(self, engine, step: int, epoch: int, client_state: dict, rank_state: dict,
             metric: float | None = None) -> str:
        """Collective: every rank calls it. Returns the tag.

        Durable (issue 21): every rank fsyncs the files it wrote and records their size and SHA-256;
        rank 0 writes ``complete.json`` with all of them only after that, fsynced, then fsyncs the
        folders. A power cut at any moment leaves either no marker (an incomplete save, ignored) or
        files that match it.
        """
        tag = f"{PREFIX}{step:07d}"
        folder = self.dir / tag
        if dist.is_main() and folder.is_dir():  # left by an earlier save of this step
            if (folder / MARKER).exists():  # its marker must not vouch for the files written now
                (folder / MARKER).unlink()
            else:  # a save cut short, maybe by more ranks: none of its files may mix with ours
                shutil.rmtree(folder)
        dist.barrier()
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        tmp = folder / f".rank-{dist.rank()}.pt.tmp"
        torch.save(rank_state, tmp)
        os.replace(tmp, folder / f"rank-{dist.rank()}.pt")
        dist.barrier()  # every rank's files are there
        mine = {f.name: _digest(f) for f in sorted(folder.iterdir())
                if f.is_file() and f.name != MARKER and not f.name.startswith(".")
                and owner(f.name) == dist.rank()}
        files = dist.gather_objects(mine)
        if dist.is_main():
            listed = dict(sorted(kv for part in files for kv in part.items()))
            marker = {"step": step, "epoch": epoch, "metric": metric, "world_size": dist.world(),
                      "format": FORMAT, "files": listed}
            fsync_dir(folder)
            write_text_durable(folder / MARKER, json.dumps(marker, indent=1))
            fsync_dir(folder)
            fsync_dir(self.dir)
            self._rotate()
        dist.barrier()
        self.last_save = time.monotonic()
        logger.info("saved checkpoint %s", folder)
        return tag

    def _rotate(self) -> None:
        done = self.complete()
        scored = [(info["metric"], step, tag) for step, tag, info in done
                  if info.get("metric") is not None]
        keep = {tag for _, tag, _ in done[-self.keep_last:]}
        if scored:
            keep.add(max(scored)[2])
        for _, tag, _ in done:
            if tag not in keep:
                shutil.rmtree(self.dir / tag, ignore_errors=True)
        for d in self.dir.glob(f"{PREFIX}*"):  # incomplete saves older than the newest complete one
            if d.is_dir() and not (d / MARKER).exists() and done and d.name < done[-1][1]:
                shutil.rmtree(d, ignore_errors=True)
        if (self.dir / UNIVERSAL).is_dir():  # conversions of tags that are gone
            for d in (self.dir / UNIVERSAL).iterdir():
                if d.name not in keep:
                    shutil.rmtree(d, ignore_errors=True)

    def best(self) -> str | None:
        scored = [(info["metric"], step, tag) for step, tag, info in self.complete()
                  if info.get("metric") is not None]
        return str(self.dir / max(scored)[2]) if scored else None

    # --------------------------------------------------------------------------------------- resume

    def load_latest(self, engine) -> Resumed | None:
        """Load the newest usable checkpoint into ``engine`` (on any world size); None when there is
        none.

        Collective. Each candidate (newest first) is verified against its marker (``verify``); a
        damaged one is moved aside to ``damaged-<tag>`` with a warning naming it, and the previous
        one is tried. Raises ``CheckpointError`` when checkpoints exist but none is usable.
        """
        damaged = []
        for tag in self._candidates():
            folder = self.dir / tag
            problems = self._verify_everywhere(folder)
            if not problems:
                return self._load(engine, folder)
            damaged.append(f"{folder}: {'; '.join(problems)}")
            moved = dist.on_main(lambda folder=folder: _move_aside(folder))
            logger.warning("checkpoint %s is damaged (%s); moved to %s, resuming from the previous "
                           "complete one if there is one", folder, "; ".join(problems), moved)
        if damaged:
            raise CheckpointError(
                f"no usable checkpoint in {self.dir}: every complete one is damaged "
                f"({' | '.join(damaged)})",
                f"the damaged folders were moved aside to {self.dir}/damaged-*; restore them from "
                f"a backup, or remove {self.dir} to train from the start")
        return None

    def _candidates(self) -> list[str]:
        """Tags with a completion marker (readable or not), newest first."""
        return sorted((m.parent.name for m in self.dir.glob(f"{PREFIX}*/{MARKER}")), reverse=True)

    def _verify_everywhere(self, folder: Path) -> list[str]:
        """``verify`` with the checksums shared out over the ranks; every rank gets all findings."""
        found = dist.all_gather_objects(verify(folder, part=(dist.rank(), dist.world())))
        return sorted({p for part in found for p in part})

    def _load(self, engine, folder: Path) -> Resumed:
        info = _read_marker(folder / MARKER) or {}
        saved = int(info["world_size"])
        if saved != dist.world() and partitioned(folder):
            client = _load_universal(engine, self._universal(folder.name), folder)
        else:
            _, client = engine.load_checkpoint(str(self.dir), tag=folder.name)
        if client is None:
            raise CheckpointError(f"DeepSpeed could not load {folder}",
                                  f"move {folder} aside to resume from the previous checkpoint")
        ranks = [torch.load(folder / f"rank-{r}.pt", weights_only=False) for r in range(saved)]
        logger.info("resumed from %s (step %d, saved by %d ranks, %d now)", folder, info["step"],
                    saved, dist.world())
        return Resumed(client, ranks, saved)

    def _universal(self, tag: str) -> Path:
        """Collective: rank 0 converts ``tag`` to a universal checkpoint once; returns
        its folder."""
        out = self.dir / UNIVERSAL / tag
        if dist.is_main() and not out.is_dir():
            tmp = self.dir / UNIVERSAL / f".{tag}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            # a child process: the converter runs its own worker pools and must not touch our
            # process group; --inject_missing_state adds the universal_checkpoint_info our
            # (non-Megatron) models do not declare
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                   str(self.dir / tag), "--output_folder", str(tmp), "--num_extract_workers", "1",
                   "--num_merge_workers", "1", "--inject_missing_state"]
            logger.info("converting %s to a universal checkpoint for another world size",
                        self.dir / tag)
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"converting {self.dir / tag} to a universal checkpoint "
                                   f"failed:\n{proc.stderr[-3000:]}")
            os.replace(tmp, out)
        dist.barrier()
        return out


def owner(name: str) -> int:
    """The rank that writes (and fsyncs, and checksums) file ``name`` of a tag folder: DeepSpeed's
    ZeRO optimizer partition ``[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` and our
    ``rank-<r>.pt`` belong to rank r, the rest (``mp_rank_00_model_states.pt``) to rank 0 (DeepSpeed
    writes the model from data-parallel rank 0)."""
    m = _OWNED.search(name)
    return int(m.group(1) or m.group(2)) if m else 0


def verify(folder: Path, part: tuple[int, int] = (0, 1)) -> list[str]:
    """What is wrong with a saved tag folder, checked against its ``complete.json``: [] when
    nothing.

    The marker must parse; every file it lists must have its size and (for the files of ``part`` =
    (i, n): every n-th listed file from the i-th, so that n ranks share the reading) its SHA-256;
    every saved rank's ``rank-<r>.pt`` must be there. Markers written before checksums existed (no
    ``files``) get the presence checks.
    """
    info = _read_marker(folder / MARKER)
    if info is None:
        return [f"{MARKER} is not readable JSON"]
    problems = [f"rank-{r}.pt missing" for r in range(int(info.get("world_size", 1)))
                if not (folder / f"rank-{r}.pt").is_file()]
    if not any(folder.glob("*model_states.pt")):
        problems.append("no *model_states.pt")
    i, n = part
    for k, (name, want) in enumerate(sorted(info.get("files", {}).items())):
        path = folder / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{name} missing")
            continue
        if size != want["size"]:
            problems.append(f"{name} has {size} bytes, {want['size']} were saved")
        elif k % n == i and _sha256(path) != want["sha256"]:
            problems.append(f"{name} does not match its checksum")
    return problems


def _read_marker(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
        return info if isinstance(info, dict) and isinstance(info.get("step"), int) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digest(path: Path) -> dict:
    """fsync ``path`` (written by this process; its pages go to the disk before the marker names it)
    and return its size and SHA-256 (read back from the page cache)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        size = os.fstat(f.fileno()).st_size
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"size": size, "sha256": digest}


def _move_aside(folder: Path) -> str:
    """Rename a damaged tag folder to ``damaged-<tag>[-<n>]`` (kept for inspection, never rotated
    or resumed)."""
    for n in range(1000):
        dest = folder.with_name(f"damaged-{folder.name}" + (f"-{n}" if n else ""))
        if not dest.exists():
            os.replace(folder, dest)
            return str(dest)
    raise CheckpointError(f"{folder} is damaged and too many damaged copies exist beside it",
                          f"remove {folder.parent}/damaged-*")


def partitioned(folder: Path) -> bool:
    """Whether a DeepSpeed tag folder holds per-rank optimizer partitions (ZeRO 1/2, bf16)."""
    return any(folder.glob("*zero_pp_rank_*optim_states.pt"))


def _load_universal(engine, folder: Path, original: Path) -> dict:
    """Load a universal checkpoint into ``engine``; returns the client state."""
    # DeepSpeed reads this flag only while loading; the engine was built before we knew the world
    # size differs
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        _, client = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    finally:
        config.load_universal_checkpoint = before
    # the universal format holds the optimizer's parameters only: buffers and frozen weights from
    # the model file
    module = torch.load(next(original.glob("*model_states.pt")), map_location="cpu",
                        weights_only=False)["module"]
    engine.module.load_state_dict(module, strict=True)
    return client


def resolve_weights(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """A checkpoint file, a DeepSpeed tag folder, a Hugging Face model folder or a run folder ->
    (weights file or Hugging Face folder, the run's config.yaml if any).

    A run folder resolves to its best complete checkpoint (by validation metric), else its
    newest one.
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
            raise FileNotFoundError(
                f"{path}: no mp_rank_00_model_states.pt inside (is it a DeepSpeed tag folder?)")
        run_cfg = path.parent.parent / "config.yaml"
        return files[0], run_cfg if run_cfg.exists() else None
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path, None
