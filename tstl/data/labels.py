"""A sample's label(s), read once here: one class, or one class per head of a multi-head shard set.

One-label sets keep the label in the ``cls`` part. A multi-head set (``shards.json`` ``heads``:
EPIC-KITCHENS' verb and noun) keeps every head's label in the json part's ``labels`` object
(``tstl.core.shards.LABELS``); its batches carry ``"label"`` as a dict head -> long tensor ``[B]``
(``collate_labels``) and, after mixup, head -> soft targets ``[B, C_head]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from tstl.core.shards import LABELS

Labels = int | dict[str, int]
"""One sample's label: a class, or head -> class."""


def sample_labels(cls: bytes, meta: Mapping, heads: Mapping[str, int] | None) -> Labels:
    """The label of a sample with ``cls`` part ``cls`` and parsed json ``meta``.

    Args:
        heads: classes per head of a multi-head set; None (or empty) for one label.

    Raises:
        ValueError, KeyError, TypeError: the parts do not hold a valid label (a multi-head label
            outside its head's classes included); the caller marks the sample bad.
    """
    if not heads:
        return int(cls)
    given = meta[LABELS]
    labels = {h: int(given[h]) for h in heads}
    for h, y in labels.items():
        if not 0 <= y < heads[h]:
            raise ValueError(f"{h} label {y} outside the shard set's {h} classes 0..{heads[h] - 1}")
    return labels


def collate_labels(labels: Sequence[Labels]) -> torch.Tensor | dict[str, torch.Tensor]:
    """A batch's ``label``: long ``[B]``, or head -> long ``[B]``."""
    if labels and isinstance(labels[0], dict):
        return {h: torch.tensor([y[h] for y in labels], dtype=torch.long)  # type: ignore[index]
                for h in labels[0]}
    return torch.tensor(labels, dtype=torch.long)
