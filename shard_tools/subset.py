"""Derive a shard set holding only some classes (e.g. one TSTL class group), copying sample bytes unchanged."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from shard_tools import shardset
from shard_tools.build import BuildOptions
from shard_tools.shardset import ShardInfo, ShardSet
from shard_tools.tario import iter_samples, write_tar

logger = logging.getLogger(__name__)


def read_group_map(path: Path) -> list[list[int]]:
    """Class groups of a group file in either format TSTL training reads (``tstl.twostage.groups``), each group's
    classes in the file's order, which is also the order of the local ids a remapped subset and an expert use."""
    from tstl.twostage.groups import load_groups

    return [list(g) for g in load_groups(path).groups]


def _filtered(src: Path, ss: ShardSet, keep: dict[int, int], remap: bool):
    for info in ss.shards:
        for key, parts in iter_samples(src / info.name):
            label = int(parts["cls"])
            if label not in keep:
                continue
            if remap:
                meta = json.loads(parts["json"])
                meta["global_label"], meta["label"] = label, keep[label]
                parts = {**parts, "cls": str(keep[label]).encode(), "json": json.dumps(meta, sort_keys=True).encode()}
            yield key, parts, (keep[label] if remap else label)


def subset(src: Path, out: Path, classes: list[int], *, remap: bool = False,
           opts: BuildOptions | None = None) -> ShardSet:
    """Write the samples of ``classes`` from shard set ``src`` into a new set ``out`` (bytes copied as they are).

    Args:
        remap: relabel to local ids 0..len(classes)-1 in the given order (the original label stays in the json as
            ``global_label``); otherwise labels are kept.
    """
    opts = opts or BuildOptions()
    ss = shardset.load(src)
    keep = {c: i for i, c in enumerate(classes)}
    out.mkdir(parents=True, exist_ok=True)
    per_shard = opts.samples_per_shard(sum(ss.class_hist().get(c, 0) for c in classes))
    infos, batch, hist = [], [], {}

    def flush() -> None:
        name = f"shard-{len(infos):06d}.tar"
        size, digest = write_tar(out / name, batch)
        infos.append(ShardInfo(name, len(batch), size, digest, dict(sorted(hist.items())), "", batch[0][0],
                               batch[-1][0]))
        batch.clear()
        hist.clear()

    for key, parts, label in _filtered(src, ss, keep, remap):
        batch.append((key, parts))
        hist[label] = hist.get(label, 0) + 1
        if len(batch) >= per_shard:
            flush()
    if batch:
        flush()
    names = [ss.classes[c] if c < len(ss.classes) else str(c) for c in classes]
    result = ShardSet(ss.dataset, ss.split, names if remap else ss.classes, infos, [],
                      {"subset_of": str(src), "classes": classes, "remapped": remap})
    shardset.save(out, result)
    logger.info("subset of %s with %d classes: %d samples in %d shards -> %s", src, len(classes), result.num_samples,
                len(infos), out)
    return result
