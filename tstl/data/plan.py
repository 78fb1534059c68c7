"""The epoch plan: which sample indices of an epoch's order each (rank, worker) slot reads (no I/O, no torch).

Sample index ``i`` is the ``i``-th sample of the epoch's shard order. A plan is a list of ``[start, stop)`` index
ranges (None: the whole order); its concatenation, repeated cyclically, is cut into slots of ``length`` positions.
Fresh epochs use the whole order; an elastic resume uses the samples the saved job had not consumed
(``tstl.data.elastic``).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence


def slot_ranges(total: int, slot: int, length: int, plan: Sequence[tuple[int, int]] | None = None
                ) -> list[tuple[int, int]]:
    """The sample indices (of an order of ``total`` samples) behind positions ``[slot * length, (slot + 1) *
    length)``, as ``[start, stop)`` ranges in reading order (``tstl.data.sources.slot_pieces`` reads them)."""
    if total == 0:
        raise ValueError("the shard set holds no samples")
    ranges = [(0, total)] if plan is None else [(int(a), int(b)) for a, b in plan if b > a]
    size = sum(b - a for a, b in ranges)
    if size == 0:
        raise ValueError("the epoch plan holds no samples")
    starts = [0]
    for a, b in ranges:
        starts.append(starts[-1] + b - a)
    out: list[tuple[int, int]] = []
    pos, end = slot * length, (slot + 1) * length
    while pos < end:
        q = pos % size
        k = bisect.bisect_right(starts, q) - 1
        a, b = ranges[k]
        first = a + q - starts[k]
        take = min(b - first, end - pos)
        if out and out[-1][1] == first:
            out[-1] = (out[-1][0], first + take)
        else:
            out.append((first, first + take))
        pos += take
    return out
