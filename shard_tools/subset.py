"""Derive a shard set holding only some classes (e.g. one TSTL class group), copying sample
bytes unchanged.

On a multi-head set (EPIC-KITCHENS) the classes are those of one head (``head``: the first one,
whose label ``cls`` holds, by default; e.g. ``noun``); the labels are kept.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from shard_tools.build import BuildOptions
from shard_tools.publish import Staging
from shard_tools.tario import iter_samples, write_tar
from tstl.core import shards
from tstl.core.groups import load_groups
from tstl.core.shards import CLS, GLOBAL_LABEL, JSON, LABELS, ShardInfo, ShardSet

logger = logging.getLogger(__name__)


def read_group_map(path: Path) -> list[list[int]]:
    """Class groups of a group file in either format TSTL training reads (``tstl.core.groups``),
    each group's classes in the file's order, which is also the order of the local ids a remapped
    subset and an expert use."""
    return [list(g) for g in load_groups(path).groups]


def _labels(parts: dict[str, bytes], heads: list[str]) -> dict[str, int]:
    """A sample's label per head: ``cls`` for a one-label set (head ``""``), else the json's."""
    if not heads:
        return {"": int(parts[CLS])}
    return {h: int(y) for h, y in json.loads(parts[JSON])[LABELS].items()}


def _filtered(src: Path, ss: ShardSet, keep: dict[int, int], remap: bool, head: str):
    heads = list(ss.heads)
    for info in ss.shards:
        for key, parts in iter_samples(src / info.name):
            labels = _labels(parts, heads)
            if labels[head] not in keep:
                continue
            label = int(parts[CLS])
            if remap:
                meta = json.loads(parts[JSON])
                meta[GLOBAL_LABEL], meta["label"] = label, keep[label]
                parts = {**parts, CLS: str(keep[label]).encode(),
                         JSON: json.dumps(meta, sort_keys=True).encode()}
            yield key, parts, (keep[label] if remap else label), labels


def subset(src: Path, out: Path, classes: list[int], *, remap: bool = False,
           head: str | None = None, opts: BuildOptions | None = None) -> ShardSet:
    """Write the samples of ``classes`` from shard set ``src`` into a new set ``out`` (bytes copied
    as they are).

    Args:
        remap: relabel to local ids 0..len(classes)-1 in the given order (the original label
            stays in the json as ``global_label``); otherwise labels are kept. One-label sets only.
        head: the head whose classes select the samples, on a multi-head set (default its first).
    """
    opts = opts or BuildOptions()
    # one generation of the source set, even if a build switches it meanwhile
    src_dir = src.resolve()
    ss = shards.load(src_dir)
    head = _check_head(ss, head, remap, src)
    keep = {c: i for i, c in enumerate(classes)}
    counts = ss.head_hist()[head] if ss.heads else ss.class_hist()
    per_shard = opts.samples_per_shard(sum(counts.get(c, 0) for c in classes))
    infos, batch, hist = [], [], {}
    head_hist: dict[str, dict[int, int]] = {h: {} for h in ss.heads}
    with Staging(out) as stage:

        def flush() -> None:
            name = f"shard-{len(infos):06d}.tar"
            size, digest = write_tar(stage.dir / name, batch)
            info = ShardInfo(name, len(batch), size, digest, dict(sorted(hist.items())), "",
                             batch[0][0], batch[-1][0])
            info.head_hist = {h: dict(sorted(c.items())) for h, c in head_hist.items()}
            infos.append(info)
            batch.clear()
            hist.clear()
            for c in head_hist.values():
                c.clear()

        for key, parts, label, labels in _filtered(src_dir, ss, keep, remap, head):
            batch.append((key, parts))
            hist[label] = hist.get(label, 0) + 1
            for h in ss.heads:
                head_hist[h][labels[h]] = head_hist[h].get(labels[h], 0) + 1
            if len(batch) >= per_shard:
                flush()
        if batch:
            flush()
        names = [ss.classes[c] if c < len(ss.classes) else str(c) for c in classes]
        params = {"subset_of": str(src), "classes": classes, "remapped": remap,
                  **({"head": head} if ss.heads else {})}
        result = ShardSet(ss.dataset, ss.split, names if remap else ss.classes, infos, [], params,
                          heads=ss.heads)
        shards.save(stage.dir, result)
        stage.publish()
    logger.info("subset of %s with %d classes: %d samples in %d shards -> %s", src, len(classes),
                result.num_samples, len(infos), out)
    return result


def _check_head(ss: ShardSet, head: str | None, remap: bool, src: Path) -> str:
    """The head that selects the samples (``""``: the one label of a one-label set)."""
    if not ss.heads:
        if head:
            raise ValueError(f"{src}: --head {head}: the set has one label per sample, no heads")
        return ""
    if remap:
        raise ValueError(f"{src}: --remap relabels one-label sets (TSTL groups); a subset of a "
                         f"multi-head set ({', '.join(ss.heads)}) keeps its labels")
    head = head or next(iter(ss.heads))
    if head not in ss.heads:
        raise ValueError(f"{src}: no head '{head}'; the set's heads: {', '.join(ss.heads)}")
    return head
