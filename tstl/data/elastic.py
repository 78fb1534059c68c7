"""Elastic resume of a training epoch: which samples a saved job already consumed, and the rest of the epoch.

A training epoch reads its samples in a seeded shard order; sample index ``i`` is the ``i``-th sample of that
order. The epoch's plan is a list of ``[start, stop)`` index ranges (the whole order for a fresh epoch) cut into
``world_size * workers`` slots of ``length`` positions, wrapping cyclically (padding). Each (rank, worker) role
reads its slot through a seeded shuffle buffer; its ``RoleState.pos`` counts the samples that left the buffer and
were decoded (emitted) or found bad. Which samples those are is recomputed here by replaying the buffer's random
draws over positions instead of samples (the same code, ``pipeline._shuffle``), so the saved state stays small.
Samples still in a buffer, or not read yet, are the remainder; a loader of any layout then spreads the remainder
over its own slots (``ShardLoader.load_state_dicts``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from tstl.data.pipeline import _shuffle, derive_seed
from tstl.data.plan import slot_ranges

Ranges = list[tuple[int, int]]


def role_order(length: int, buffer: int, seed: int) -> list[int]:
    """Positions ``0..length-1`` of a role's slot in the order its shuffle buffer emits them."""
    if buffer <= 1:
        return list(range(length))
    return list(_shuffle(iter(range(length)), buffer, random.Random(seed)))


def _indices(ranges: Ranges) -> list[int]:
    return [i for a, b in ranges for i in range(a, b)]


def to_ranges(indices: set[int] | Sequence[int]) -> Ranges:
    """Sorted ``[start, stop)`` ranges of a set of sample indices."""
    out: Ranges = []
    for i in sorted(indices):
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def covered(state: dict, num_samples: int) -> set[int]:
    """Sample indices the saved epoch plan covers (all of its plan with padding; a prefix with ``drop``)."""
    slots = state["world_size"] * state["workers"]
    return set(_indices(slot_ranges(num_samples, 0, slots * _plan_length(state), state.get("plan"))))


def consumed(state: dict, num_samples: int) -> set[int]:
    """Sample indices one saved rank's roles took out of their shuffle buffers (emitted, or found bad)."""
    out: set[int] = set()
    rank, workers, length = state["rank"], state["workers"], _plan_length(state)
    buffer = state.get("shuffle_buffer", 0)
    for role, st in state["roles"].items():
        pos = min(int(st["pos"]), length)
        if pos <= 0:
            continue
        idx = _indices(slot_ranges(num_samples, rank * workers + int(role), length, state.get("plan")))
        order = role_order(length, buffer, derive_seed(state["seed"], state["epoch"], rank, int(role), 1))
        out.update(idx[order[k]] for k in range(pos))
    return out


def remainder(states: Sequence[dict], num_samples: int) -> Ranges:
    """The samples of the saved epoch that no rank of the saved job consumed, as sorted index ranges.

    Args:
        states: ``ShardLoader.state_dict()`` of every rank of the saved job.
        num_samples: samples in the shard set.
    """
    done: set[int] = set()
    for st in states:
        done |= consumed(st, num_samples)
    return to_ranges(covered(states[0], num_samples) - done)



def _plan_length(state: dict) -> int:
    """Per-role length of the saved plan (states written before elastic resume existed have only ``length``)."""
    return int(state.get("plan_length") or state["length"])
