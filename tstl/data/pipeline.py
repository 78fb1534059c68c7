"""The per-worker stream: pieces -> tar samples -> shuffle buffer -> decode -> sampling -> augmentation -> batches.

Each DataLoader worker plays one "role" (a (rank, worker) slot of the epoch plan) and emits exactly the same
number of batches as every other role, whatever happens to individual samples. Every batch carries private
``_role``/``_state`` entries that ``ShardLoader`` strips and keeps as resume state.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from tstl.core.shards import CLS, JSON, MP4, PARTS
from tstl.data import sampling
from tstl.data.buffers import BUFFERS_EXTRA, Link, Pool
from tstl.data.config import DataConfig
from tstl.data.decode import BadSample, decode_clip
from tstl.data.sources import (
    READ_ERRORS,
    Piece,
    ShardList,
    epoch_order,
    is_remote,
    iter_tar,
    keep,
    retry_pause,
    slot_pieces,
)
from tstl.data.transforms import TrainClipTransform
from tstl.data.views import decode_views

logger = logging.getLogger(__name__)


class BadSampleRateError(RuntimeError):
    """More samples than ``max_bad_fraction`` were bad: the data needs fixing, not the loader."""


@dataclass
class RoleState:
    """Progress of one role within an epoch (what resuming needs)."""

    pos: int = 0
    """Raw samples consumed from the shuffled stream."""
    emitted: int = 0
    """Clips (train) or views (eval) put into batches."""
    bad: int = 0
    """Raw samples that were bad."""
    last_good: int = -1
    """Position of the last good raw sample (the filler source)."""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class StreamSpec:
    """Everything a worker needs to produce its part of an epoch."""

    cfg: DataConfig
    shardset: ShardList
    train: bool
    rank: int
    world_size: int
    epoch: int
    slots_per_rank: int
    length: int
    """Raw samples per role (clips in training, videos in evaluation)."""
    views: tuple[int, int] = (1, 1)
    start: dict[int, RoleState] = field(default_factory=dict)
    role_offset: int = 0
    """Worker ``i`` plays role ``(i + role_offset) % slots_per_rank`` (resume keeps the batch order exact)."""
    label_map: dict[int, int] | None = None
    """Relabelling ``y -> label_map[y]`` (the shard set holds only samples whose label is a key)."""
    worker_augment: bool = True
    """Training: RandAugment in the worker (``augment_on: worker``); False = crop only, the device does the rest."""
    plan: list[tuple[int, int]] | None = None
    """The sample-index ranges this epoch's slots share (None: the whole epoch); set after an elastic resume."""
    buffers: Link | None = None
    """Where workers get their batch buffers back for reuse (``tstl.data.buffers``); None: a new one per batch."""


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from a tuple of integers (epoch, rank, role, ...), well mixed by NumPy's SeedSequence."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def _read(pieces: list[Piece], labels: frozenset[int] | None = None, timeout_s: float = 0.0,
          retries: int = 0) -> Iterator[dict]:
    """Raw samples of the pieces; a shard that ends early or breaks yields placeholders marked ``_error``.

    With ``labels``, positions count only the samples of those labels (the shard counts were filtered the same way).
    A remote shard (``pipe:``, http(s)) that fails or sends nothing for ``timeout_s`` seconds is opened again up to
    ``retries`` times, going on after the samples already read; then its remaining samples are bad.
    """
    for piece in pieces:
        got, attempt = 0, 0
        while True:
            try:
                stream = iter_tar(piece.shard.url, timeout_s)
                try:
                    for i, sample in enumerate(s for s in stream if keep(s, labels)):
                        if i < piece.skip + got:
                            continue
                        if got == piece.take:
                            break
                        sample["_shard"] = piece.shard.name
                        got += 1
                        yield sample
                finally:
                    stream.close()
            except READ_ERRORS as e:
                if attempt < retries and is_remote(piece.shard.url):
                    attempt += 1
                    logger.warning("%s: read failed after %d samples (%s: %s); retry %d of %d", piece.shard.url,
                                   got, type(e).__name__, e, attempt, retries)
                    retry_pause(attempt)
                    continue
                logger.error("%s: unreadable after %d samples: %s", piece.shard.url, got, e)
                tries = f" after {attempt + 1} attempts" if attempt else ""
                reason = f"shard unreadable{tries}: {type(e).__name__}: {e}"
            else:
                reason = "shard has fewer samples than shards.json says"
            break
        for i in range(got, piece.take):
            yield {"__key__": f"{piece.shard.name}#{piece.skip + i}", "_shard": piece.shard.name, "_error": reason}


def _shuffle(src: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Reservoir shuffle: fill ``size`` samples, then emit a random one per sample read."""
    buf: list[dict] = []
    for sample in src:
        buf.append(sample)
        if len(buf) >= size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class ClipStream(IterableDataset):
    """Iterable over batches of one rank; each DataLoader worker produces one role's batches."""

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__()
        self.spec = spec

    # ---- set-up -------------------------------------------------------------------------------------------
    def _role(self) -> int:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return (worker + self.spec.role_offset) % self.spec.slots_per_rank

    def _raw(self, role: int) -> Iterator[dict]:
        s = self.spec
        slot = s.rank * s.slots_per_rank + role
        order = epoch_order(s.shardset.shards, derive_seed(s.cfg.seed, s.epoch, 0x5A5A) if s.train else None)
        raw = _read(slot_pieces(order, slot, s.length, s.plan), s.shardset.labels, s.cfg.read_timeout_s,
                    s.cfg.read_retries)
        if s.train and s.cfg.shuffle_buffer > 1:
            raw = _shuffle(raw, s.cfg.shuffle_buffer, random.Random(derive_seed(s.cfg.seed, s.epoch, s.rank, role, 1)))
        return raw

    # ---- per sample ---------------------------------------------------------------------------------------
    def _parse(self, sample: dict) -> tuple[bytes, int, int]:
        if "_error" in sample:
            raise BadSample(sample["_error"])
        missing = [p for p in PARTS if p not in sample]
        if missing:
            raise BadSample(f"missing part(s) {', '.join(missing)}")
        try:
            label = int(sample[CLS])
            frames = int(json.loads(sample[JSON])["frames"])
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise BadSample(f"bad {CLS}/{JSON}: {e}") from None
        # An out-of-range label would index past the head (or mixup's one-hot) far from its sample: bad here.
        n = self.spec.shardset.num_classes
        if label < 0 or (n is not None and label >= n):
            raise BadSample(f"label {label} outside the shard set's classes 0..{n - 1}" if n is not None
                            else f"negative label {label}")
        if self.spec.label_map is not None:
            if label not in self.spec.label_map:
                raise BadSample(f"label {label} is not a key of the label_map")
            label = self.spec.label_map[label]
        return sample[MP4], label, frames

    # ---- bad samples --------------------------------------------------------------------------------------
    def _bad(self, sample: dict, reason: str, st: RoleState) -> None:
        """Count, log and quarantine a bad sample. The limit (``max_bad_fraction``) is not checked here but in the
        training process over all ranks (``ShardLoader._check_bad``), so every rank decides alike."""
        cfg = self.spec.cfg
        st.bad += 1
        reason = reason.replace("\t", " ").replace("\n", " ")  # one quarantine line per sample
        logger.warning("bad sample %s in %s: %s", sample.get("__key__"), sample.get("_shard"), reason)
        if cfg.quarantine:
            with open(cfg.quarantine, "a") as f:
                f.write(f"{sample.get('__key__')}\t{sample.get('_shard')}\t{reason}\n")

    # ---- main loop ----------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        s = self.spec
        role = self._role()
        st = RoleState(**self.spec.start[role].to_dict()) if role in self.spec.start else RoleState()
        items: Items = TrainClips(self, role) if s.train else EvalClipViews(self)
        in_worker = get_worker_info() is not None
        self._pool = Pool(s.buffers if in_worker else None, role, s.cfg.prefetch_factor + BUFFERS_EXTRA)
        raw = self._raw(role)
        try:
            yield from self._emit(raw, items.make, role, st, s.length * items.per_raw, items.batch_size)
        finally:
            raw.close()  # an early stop must not leave a tar stream (or a pipe: process) open

    def _emit(self, raw: Iterator[dict], make: Callable[[dict, int], list[tuple]], role: int, st: RoleState,
              target: int, bsz: int) -> Iterator[dict]:
        """Decode, augment and batch the raw stream, then top the role up to ``target`` items."""
        s = self.spec
        reservoir: dict | None = None
        pending: list[tuple] = []
        for pos, sample in enumerate(raw):
            if pos < st.pos:  # resuming: skip without decoding, but remember the filler source
                if pos == st.last_good:
                    reservoir = sample
                continue
            try:
                items = make(sample, pos)
            except BadSample as e:
                st.pos = pos + 1
                self._bad(sample, str(e), st)
                continue
            st.pos, st.last_good, reservoir = pos + 1, pos, sample
            pending += items
            while len(pending) >= bsz:
                st.emitted += bsz
                yield self._batch(pending[:bsz], role, st)
                pending = pending[bsz:]
        # Bad or missing samples leave the role short: refill from the last good sample (new augmentation) so
        # every role, hence every rank, emits exactly the planned number of batches.
        while st.emitted + len(pending) < target:
            if reservoir is None:
                # Nothing to refill from: tell the training process, which stops every rank together.
                logger.error("rank %d role %d: no decodable sample in its %d samples", s.rank, role, s.length)
                yield {"_role": role, "_state": st.to_dict(), "_starved": True}
                return
            pending = (pending + make(reservoir, s.length + st.emitted + len(pending)))[:target - st.emitted]
            while len(pending) >= bsz:
                st.emitted += bsz
                yield self._batch(pending[:bsz], role, st)
                pending = pending[bsz:]
        if pending:
            st.emitted += len(pending)
            yield self._batch(pending, role, st)

    def _batch(self, items: list[tuple], role: int, st: RoleState) -> dict:
        batch = {
            # uint8 [B, T, S, S, 3], stacked in a worker straight into a (reused) shared-memory buffer: one copy
            "video": self._pool.collate([it[0] for it in items]),
            "label": torch.tensor([it[1] for it in items], dtype=torch.long),
            "key": [it[2] for it in items],
            "_role": role,
            "_state": st.to_dict(),
        }
        if not self.spec.train:
            batch["view"] = torch.tensor([it[3] for it in items], dtype=torch.long)
        return batch


class Items(Protocol):
    """What a raw sample becomes: training clips or evaluation views (one batching loop serves both)."""

    per_raw: int
    """Items per raw sample."""
    batch_size: int

    def make(self, sample: dict, pos: int) -> list[tuple]:
        """``(uint8 clip [T, S, S, 3], label, key, view)`` items of a sample at stream position ``pos``."""
        ...


class TrainClips:
    """Training: one clip per sample, frame offsets and augmentation drawn from (seed, epoch, rank, role, pos)."""

    per_raw = 1

    def __init__(self, stream: ClipStream, role: int) -> None:
        self.stream, self.role = stream, role
        self.batch_size = stream.spec.cfg.batch_size
        self.tf = TrainClipTransform(stream.spec.cfg, augment=stream.spec.worker_augment)

    def make(self, sample: dict, pos: int) -> list[tuple]:
        s, cfg = self.stream.spec, self.stream.spec.cfg
        data, label, frames = self.stream._parse(sample)
        rng = np.random.default_rng(derive_seed(cfg.seed, s.epoch, s.rank, self.role, pos, 3))
        clip = decode_clip(data, frames, lambda n: sampling.train_indices(
            cfg.sampling, n, cfg.num_frames, cfg.sampling_rate, rng, cfg.sampling_convention), cfg.decode_timeout_s,
            cfg.decoder)
        aug = np.random.default_rng(derive_seed(cfg.seed, s.epoch, s.rank, self.role, pos, 2))
        return [(self.tf(clip, aug), label, sample["__key__"], 0)]


class EvalClipViews:
    """Evaluation: T temporal x C spatial views per sample, deterministic
    (``tstl.data.views.decode_views``)."""

    def __init__(self, stream: ClipStream) -> None:
        self.stream = stream
        self.per_raw = stream.spec.views[0] * stream.spec.views[1]
        self.batch_size = stream.spec.cfg.eval_batch_size

    def make(self, sample: dict, pos: int) -> list[tuple]:
        data, label, frames = self.stream._parse(sample)
        clips = decode_views(data, frames, self.stream.spec.cfg, self.stream.spec.views)
        return [(clip, label, sample["__key__"], v) for v, clip in enumerate(clips)]
