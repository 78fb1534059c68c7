"""Class groups for TSTL: generation (balanced, from a confusion matrix).

The group file format (``ClassGroups``, ``load_groups``/``save_groups``, ``GroupFileError``) is
owned by ``tstl.core.groups`` and re-exported here for the TSTL modules.
"""

from __future__ import annotations

import numpy as np

from tstl.core.groups import OUR_FORMAT, ClassGroups, GroupFileError, load_groups, save_groups

__all__ = ["OUR_FORMAT", "ClassGroups", "GroupFileError", "balanced_groups", "confusion_groups",
           "load_groups", "save_groups"]


def balanced_groups(num_classes: int, num_groups: int) -> ClassGroups:
    """Contiguous groups whose sizes differ by at most one."""
    if not 0 < num_groups <= num_classes:
        raise ValueError(f"num_groups must be in [1, {num_classes}], got {num_groups}")
    return ClassGroups(tuple(tuple(int(c) for c in a)
                             for a in np.array_split(np.arange(num_classes), num_groups)),
                       num_classes)


def confusion_groups(confusion: np.ndarray, num_groups: int) -> ClassGroups:
    """Group classes so that mutually confused classes share a group, with balanced sizes.

    Method: greedy capacity-constrained agglomeration. The row-normalised confusion matrix is
    symmetrised (``A = P + P^T``, diagonal zeroed), each class starts as its own cluster, and the
    pair of clusters with the highest mean pairwise affinity is merged as long as the merged size
    stays within ``ceil(N / K)``. Merging stops at ``K`` clusters; if the cap blocks progress first,
    the smallest clusters are merged (a fallback that only happens for degenerate inputs). Groups
    are then ordered by their smallest class id and classes within a group are sorted, so the result
    is deterministic.

    Args:
        confusion: ``[N, N]`` counts, rows = true class, columns = predicted class.
        num_groups: Number of groups ``K``.
    """
    c = np.asarray(confusion, dtype=np.float64)
    n = c.shape[0]
    if c.ndim != 2 or c.shape[1] != n:
        raise ValueError(f"confusion must be square, got shape {c.shape}")
    if not 0 < num_groups <= n:
        raise ValueError(f"num_groups must be in [1, {n}], got {num_groups}")
    p = c / np.maximum(c.sum(axis=1, keepdims=True), 1e-12)
    a = p + p.T
    np.fill_diagonal(a, 0.0)
    cap = -(-n // num_groups)
    clusters: list[list[int]] = [[i] for i in range(n)]
    while len(clusters) > num_groups:
        best, pair = -1.0, None
        for i in range(len(clusters)):
            for j in range(i + 1, len(clusters)):
                if len(clusters[i]) + len(clusters[j]) > cap:
                    continue
                score = a[np.ix_(clusters[i], clusters[j])].mean()
                if score > best:
                    best, pair = score, (i, j)
        if pair is None:  # cap blocks every merge: join the two smallest clusters
            order = sorted(range(len(clusters)), key=lambda k: len(clusters[k]))
            pair = tuple(sorted(order[:2]))
        i, j = pair
        clusters[i] = clusters[i] + clusters[j]
        del clusters[j]
    groups = sorted((tuple(sorted(m)) for m in clusters), key=lambda m: m[0])
    return ClassGroups(tuple(groups), n)
