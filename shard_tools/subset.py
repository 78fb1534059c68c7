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
    """Class groups from TSTL's ``class_grouping.json`` (``class_to_head``) or ``{"groups": [[ids], ...]}``."""
    data = json.loads(path.read_text())
    if "groups" in data:
        return [list(map(int, g)) for g in data["groups"]]
    if "class_to_head" in data:
        groups: dict[int, list[int]] = {}
        for cls, head in data["class_to_head"].items():
            groups.setdefault(int(head), []).append(int(cls))
        return [sorted(groups[h]) for h in sorted(groups)]
    raise ValueError(f"{path}: expected 'class_to_head' (TSTL format) or 'groups'")


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
