"""The per-worker stream: its batches' samples (``partition``) -> read (``reader``) -> decode ->
sampling -> augmentation -> uint8 batches.

Worker ``i`` of a rank produces the rank's steps ``first + i, first + i + W, ...`` (DataLoader takes
one batch from each worker in turn, so the rank sees its steps in order). In training a step's
samples are the batch positions of the canonical partition; every random draw of a clip is keyed by
(seed, epoch, position), so the same epoch gives the same clips on any number of ranks and workers.
A bad sample is replaced within its batch (by the nearest good sample of the batch, re-augmented; by
the next good samples of the order when the whole batch is bad), so batches stay full and step
counts equal. In evaluation each worker takes a consecutive share of its rank's videos and emits
T x C views per video; a bad video's views are replaced by a good video's (same key and view:
merged away).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from tstl.core.shards import CLS, JSON, MP4, PARTS
from tstl.core.transport import ReadPolicy
from tstl.data import partition, sampling
from tstl.data.buffers import BUFFERS_EXTRA, Link, Pool
from tstl.data.cache import NodeCache
from tstl.data.config import DataConfig
from tstl.data.decode import BadSample, decode_clip
from tstl.data.labels import Labels, collate_labels, sample_labels
from tstl.data.reader import SampleReader
from tstl.data.seeds import derive_seed
from tstl.data.sources import ShardList
from tstl.data.transforms import TrainClipTransform
from tstl.data.views import decode_views

logger = logging.getLogger(__name__)

LOOKAHEAD = 64
"""A batch whose samples are all bad is filled from at most this many following samples of the
order."""


class BadSampleRateError(RuntimeError):
    """More samples than ``max_bad_fraction`` were bad: the data needs fixing, not the loader."""


@dataclass
class StreamSpec:
    """Everything a worker needs to produce its part of an epoch (picklable; the index travels with
    it)."""

    cfg: DataConfig
    shardset: ShardList
    train: bool
    rank: int
    world_size: int
    epoch: int
    workers: int
    steps: int
    """Batches of this rank in the epoch (``len(loader)``)."""
    first_step: int = 0
    """The step the iteration starts at (a resume)."""
    segment: partition.Segment = partition.FRESH
    """Training: where ``first_step``'s stretch of the epoch starts."""
    views: tuple[int, int] = (1, 1)
    label_map: dict[int, int] | None = None
    """Relabelling ``y -> label_map[y]`` (the shard set holds only samples whose label is a key)."""
    worker_augment: bool = True
    """Training: RandAugment in the worker (``augment_on: worker``); False = crop only, the device
    does the rest."""
    buffers: Link | None = None
    """Where workers get their batch buffers back for reuse (``tstl.data.buffers``); None: a new one
    per batch."""

    def order(self) -> np.ndarray:
        """The epoch's sample order (index rows)."""
        ss, c = self.shardset, self.cfg
        if not self.train:
            return ss.rows
        seed = derive_seed(c.seed, self.epoch, partition.ORDER_SEED_TAG)
        return partition.train_order(ss.index.shard, ss.rows, len(ss.shards), seed, c.shuffle_block)


class ClipStream(IterableDataset):
    """Iterable over the batches of one rank; each DataLoader worker produces its share of them."""

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__()
        self.spec = spec

    # ---- set-up ----------------------------------------------------------------------------------
    def _worker(self) -> int:
        info = get_worker_info()
        return info.id if info is not None else 0

    def _reader(self) -> SampleReader:
        c, ss = self.spec.cfg, self.spec.shardset
        cache = None
        if c.cache_dir and ss.remote():
            cache = NodeCache(c.cache_dir, ss.fingerprint, int(c.cache_limit_gb * 1e9))
        return SampleReader(ss, ReadPolicy(c.read_timeout_s, c.read_retries), cache)

    # ---- per sample ------------------------------------------------------------------------------
    def _parse(self, sample: dict) -> tuple[bytes, Labels, int]:
        if "_error" in sample:
            raise BadSample(sample["_error"])
        missing = [p for p in PARTS if p not in sample]
        if missing:
            raise BadSample(f"missing part(s) {', '.join(missing)}")
        try:
            meta = json.loads(sample[JSON])
            frames = int(meta["frames"])
            label = sample_labels(sample[CLS], meta, self.spec.shardset.head_sizes)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise BadSample(f"bad {CLS}/{JSON}: {e}") from None
        if isinstance(label, dict):  # multi-head: checked by sample_labels, never relabelled
            return sample[MP4], label, frames
        # An out-of-range label would index past the head (or mixup's one-hot) far from its sample:
        # bad here.
        n = self.spec.shardset.num_classes
        if label < 0 or (n is not None and label >= n):
            raise BadSample(f"label {label} outside the shard set's classes 0..{n - 1}"
                            if n is not None else f"negative label {label}")
        if self.spec.label_map is not None:
            if label not in self.spec.label_map:
                raise BadSample(f"label {label} is not a key of the label_map")
            label = self.spec.label_map[label]
        return sample[MP4], label, frames

    def _bad(self, sample: dict, reason: str) -> None:
        """Log and quarantine a bad sample. The limit (``max_bad_fraction``) is not checked here but
        in the training process over all ranks (``ShardLoader._check_bad``), so every rank decides
        alike."""
        cfg = self.spec.cfg
        reason = reason.replace("\t", " ").replace("\n", " ")  # one quarantine line per sample
        logger.warning("bad sample %s in %s: %s", sample.get("__key__"), sample.get("_shard"),
                       reason)
        if cfg.quarantine:
            with open(cfg.quarantine, "a") as f:
                f.write(f"{sample.get('__key__')}\t{sample.get('_shard')}\t{reason}\n")

    # ---- main loop -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        s = self.spec
        worker = self._worker()
        in_worker = get_worker_info() is not None
        self._pool = Pool(s.buffers if in_worker else None, worker,
                          s.cfg.prefetch_factor + BUFFERS_EXTRA)
        reader = self._reader()
        try:
            if s.train:
                yield from self._train(reader, worker)
            else:
                yield from self._eval(reader, worker)
        finally:
            reader.close()  # an early stop must not leave a file, connection or pipe: process open

    def _train(self, reader: SampleReader, worker: int) -> Iterator[dict]:
        s = self.spec
        order = s.order()
        n = len(order)
        make = TrainClips(self).make
        steps = range(s.first_step + worker, s.steps, s.workers)

        def rows(step: int) -> tuple[np.ndarray, np.ndarray]:
            pos = s.segment.positions(step, s.rank, s.world_size, s.cfg.batch_size)
            return pos, order[pos % n]

        with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as pool:
            ahead: Future | None = None
            for k, step in enumerate(steps):
                pos, r = rows(step)
                samples = ahead.result() if ahead is not None else reader.fetch(r)
                if k + 1 < len(steps):  # read the next batch while this one decodes
                    ahead = pool.submit(reader.fetch, rows(steps[k + 1])[1])
                yield self._train_batch(samples, pos, order, reader, make)

    def _train_batch(self, samples: list[dict], pos: np.ndarray, order: np.ndarray,
                     reader: SampleReader, make: Callable[[dict, int], list[tuple]]) -> dict:
        """One full training batch: bad samples replaced by good ones of the batch, re-augmented at
        their own positions (or, when none is good, by the next good samples of the order)."""
        items: list[tuple | None] = [None] * len(samples)
        good: list[int] = []
        bad = 0
        for t, (sample, p) in enumerate(zip(samples, pos)):
            try:
                items[t] = make(sample, int(p))[0]
                good.append(t)
            except BadSample as e:
                bad += 1
                self._bad(sample, str(e))
        read = len(samples)
        if not good and len(samples):
            # look further along the order for something to fill with; those samples are counted
            # (and quarantined) by the batches they belong to, not here
            n = len(order)
            for extra in range(LOOKAHEAD):
                q = int(pos[-1]) + 1 + extra
                sample = reader.fetch([order[q % n]])[0]
                try:
                    make(sample, q)
                except BadSample:
                    continue
                samples = [*samples, sample]
                good.append(len(samples) - 1)
                break
            else:
                logger.error("rank %d: no decodable sample in a batch and the %d samples after it",
                             self.spec.rank, LOOKAHEAD)
                return {"_bad": bad, "_read": read, "_starved": True}
        for t, item in enumerate(items):
            if item is None:  # nearest good sample of the batch, with this position's augmentation
                src = min(good, key=lambda g, t=t: (abs(g - t), g))
                items[t] = make(samples[src], int(pos[t]))[0]
        return {**self._batch(items), "_bad": bad, "_read": read}

    def _eval(self, reader: SampleReader, worker: int) -> Iterator[dict]:
        s = self.spec
        order = s.order()
        share = partition.split_even(partition.eval_share(len(order), s.rank, s.world_size),
                                     s.workers)[worker]
        views = EvalClipViews(self)
        bsz = views.batch_size
        pending: list[tuple] = []
        last_good: list[tuple] | None = None
        holes = bad = read = 0
        window = max(8, bsz // views.per_raw)  # videos fetched together (neighbours: one request)
        for start in range(0, len(share), window):
            pos = share[start:start + window]
            for sample, p in zip(reader.fetch(order[pos % len(order)]), pos):
                read += 1
                try:
                    items = views.make(sample, int(p))
                except BadSample as e:
                    bad += 1
                    self._bad(sample, str(e))
                    if last_good is None:
                        holes += 1  # filled once a good video comes
                        continue
                    items = last_good
                if last_good is None:
                    items = items * (holes + 1)
                    holes = 0
                last_good = items[:views.per_raw]
                pending += items
                while len(pending) >= bsz:
                    yield {**self._batch(pending[:bsz]), "_bad": bad, "_read": read}
                    pending, bad, read = pending[bsz:], 0, 0
        if holes:
            logger.error("rank %d worker %d: none of its %d videos could be decoded", s.rank,
                         worker, len(share))
            yield {"_bad": bad, "_read": read, "_starved": True}
            return
        if pending:
            yield {**self._batch(pending), "_bad": bad, "_read": read}

    def _batch(self, items: list[tuple]) -> dict:
        batch = {
            # uint8 [B, T, S, S, 3], stacked in a worker straight into a (reused) shared-memory
            # buffer: one copy
            "video": self._pool.collate([it[0] for it in items]),
            "label": collate_labels([it[1] for it in items]),
            "key": [it[2] for it in items],
        }
        if not self.spec.train:
            batch["view"] = torch.tensor([it[3] for it in items], dtype=torch.long)
        return batch


class Items(Protocol):
    """What a sample becomes: training clips or evaluation views."""

    per_raw: int
    """Items per sample."""
    batch_size: int

    def make(self, sample: dict, pos: int) -> list[tuple]:
        """``(uint8 clip [T, S, S, 3], label, key, view)`` items of the sample at epoch position
        ``pos``."""
        ...


class TrainClips:
    """Training: one clip per sample, frame offsets and augmentation drawn from (seed, epoch,
    position)."""

    per_raw = 1

    def __init__(self, stream: ClipStream) -> None:
        self.stream = stream
        self.batch_size = stream.spec.cfg.batch_size
        self.tf = TrainClipTransform(stream.spec.cfg, augment=stream.spec.worker_augment)

    def make(self, sample: dict, pos: int) -> list[tuple]:
        s, cfg = self.stream.spec, self.stream.spec.cfg
        data, label, frames = self.stream._parse(sample)
        rng = np.random.default_rng(derive_seed(cfg.seed, s.epoch, pos, 3))
        clip = decode_clip(data, frames, lambda n: sampling.train_indices(
            cfg.sampling, n, cfg.num_frames, cfg.sampling_rate, rng, cfg.sampling_convention),
            cfg.decode_timeout_s, cfg.decoder)
        aug = np.random.default_rng(derive_seed(cfg.seed, s.epoch, pos, 2))
        return [(self.tf(clip, aug), label, sample["__key__"], 0)]


class EvalClipViews:
    """Evaluation: T temporal x C spatial views per sample, deterministic
    (``tstl.data.views.decode_views``, which ``tstl predict`` uses too)."""

    def __init__(self, stream: ClipStream) -> None:
        self.stream = stream
        self.per_raw = stream.spec.views[0] * stream.spec.views[1]
        self.batch_size = stream.spec.cfg.eval_batch_size

    def make(self, sample: dict, pos: int) -> list[tuple]:
        data, label, frames = self.stream._parse(sample)
        clips = decode_views(data, frames, self.stream.spec.cfg, self.stream.spec.views)
        return [(clip, label, sample["__key__"], v) for v, clip in enumerate(clips)]
