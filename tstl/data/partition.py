"""The canonical partition: which samples every batch of an epoch holds, as a function of the data
alone.

The epoch's sample order depends only on (seed, epoch, shard set): in training, the shards are put
in a seeded order, cut into blocks of ``block`` shards (0 = one block of the whole set), and the
samples of each block are shuffled together; in evaluation it is the listed order. Position ``p`` of
the epoch is sample ``order[p % n]`` (positions past ``n`` wrap: that is the padding rule).

Training batches are consecutive runs of ``batch`` positions, dealt to the ranks in turn: global
batch ``g`` is positions ``[g * batch, (g + 1) * batch)`` and goes to rank ``g % world``; a rank's
step ``j`` is global batch ``j * world + rank``. Every rank therefore takes a step out of the same
stretch of the order, and after ``s`` steps of a job the consumed samples are exactly the first
``s * world * batch`` positions, whatever the world size or worker count. A resume -- on the same
layout or another -- goes on from that position (``Segment``): nothing is re-read but the batches
that were in flight, and the resume state is one integer.

Nothing here reads data or needs torch; the loader, the I/O planner (``benchmarks/loader_io.py``)
and the tests use the same functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ORDER_SEED_TAG = 0x5A5A
"""Mixed into the order's seed (the value the loader used for its shard order before this
module)."""


def train_order(shard_of: np.ndarray, rows: np.ndarray, num_shards: int, seed: int,
                block: int) -> np.ndarray:
    """The training order of ``rows`` (index rows; ``shard_of[row]`` is a row's shard) for one
    epoch's ``seed``.

    Shards get a seeded order and are grouped into blocks of ``block`` shards (0: the whole set is
    one block); the rows of a block are shuffled together. A sample stays inside its block, so with
    a small ``block`` a stretch of the order touches few shards; with the default (whole set) every
    batch mixes samples from all over the set.
    """
    rng = np.random.default_rng(seed)
    shard_rank = np.empty(num_shards, dtype=np.int64)
    shard_rank[rng.permutation(num_shards)] = np.arange(num_shards)
    blocks = shard_rank[shard_of[rows]] // (block if block > 0 else max(num_shards, 1))
    return rows[np.lexsort((rng.random(len(rows)), blocks))]


def steps_per_rank(n: int, world: int, batch: int, drop: bool) -> int:
    """Training batches per rank for ``n`` samples: all of them with padding (``drop=False``: the
    last batches are topped up from the start of the order), or only full rounds (``drop=True``:
    fewer than ``world * batch`` samples are left out)."""
    unit = world * batch
    return n // unit if drop else math.ceil(n / unit)


@dataclass(frozen=True)
class Segment:
    """A stretch of a training epoch on one layout: step ``first_step`` starts at position
    ``start``.

    A fresh epoch is ``Segment(0, 0)``; a resume at consumed position ``p`` is
    ``Segment(p, steps - left)``, where ``left`` is what ``steps_left`` gives, so step numbers
    always count to the epoch's end on this layout.
    """

    start: int
    first_step: int

    def positions(self, step: int, rank: int, world: int, batch: int) -> np.ndarray:
        """The epoch positions of rank ``rank``'s batch at ``step``."""
        first = self.start + ((step - self.first_step) * world + rank) * batch
        return np.arange(first, first + batch, dtype=np.int64)

    def consumed(self, step: int, world: int, batch: int) -> int:
        """Positions taken by the whole job once every rank finished ``step`` steps."""
        return self.start + (step - self.first_step) * world * batch


FRESH = Segment(0, 0)
"""A training epoch from its start."""


def steps_left(n: int, position: int, world: int, batch: int, drop: bool) -> int:
    """Steps a layout still takes in an epoch of ``n`` samples whose first ``position`` positions
    are consumed."""
    return steps_per_rank(max(n - position, 0), world, batch, drop) if position < n else 0


def resume_segment(n: int, position: int, world: int, batch: int, drop: bool) -> Segment:
    """Where a layout goes on after ``position`` positions of the epoch were consumed."""
    total = steps_per_rank(n, world, batch, drop)
    return Segment(position, total - min(total, steps_left(n, position, world, batch, drop)))


def eval_share(n: int, rank: int, world: int) -> np.ndarray:
    """Evaluation positions of ``rank``: ``ceil(n / world)`` consecutive ones (the last rank's wrap
    to the start, so every rank has as many videos; repeats carry the same key and view and are
    merged away)."""
    per = math.ceil(n / world)
    return np.arange(rank * per, (rank + 1) * per, dtype=np.int64)


def split_even(items: np.ndarray, parts: int) -> list[np.ndarray]:
    """``items`` cut into ``parts`` consecutive pieces whose sizes differ by at most one (earlier
    ones larger)."""
    return [np.asarray(p) for p in np.array_split(items, parts)]
