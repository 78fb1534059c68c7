"""Derive a shard set holding only some classes (e.g. one TSTL class group), copying sample bytes unchanged."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from shard_tools.build import BuildOptions
from shard_tools.publish import Staging
from shard_tools.tario import iter_samples, write_tar
from tstl.core import shards
from tstl.core.groups import load_groups
from tstl.core.shards import CLS, GLOBAL_LABEL, JSON, ShardInfo, ShardSet

logger = logging.getLogger(__name__)


def read_group_map(path: Path) -> list[list[int]]:
    """Class groups of a group file in either format TSTL training reads (``tstl.core.groups``), each group's
    classes in the file's order, which is also the order of the local ids a remapped subset and an expert use."""
    return [list(g) for g in load_groups(path).groups]


def _filtered(src: Path, ss: ShardSet, keep: dict[int, int], remap: bool):
    for info in ss.shards:
        for key, parts in iter_samples(src / info.name):
            label = int(parts[CLS])
            if label not in keep:
                continue
            if remap:
                meta = json.loads(parts[JSON])
                meta[GLOBAL_LABEL], meta["label"] = label, keep[label]
                parts = {**parts, CLS: str(keep[label]).encode(), JSON: json.dumps(meta, sort_keys=True).encode()}
            yield key, parts, (keep[label] if remap else label)


def subset(src: Path, out: Path, classes: list[int], *, remap: bool = False,
           opts: BuildOptions | None = None) -> ShardSet:
    """Write the samples of ``classes`` from shard set ``src`` into a new set ``out`` (bytes copied as they are).

    Args:
        remap: relabel to local ids 0..len(classes)-1 in the given order (the original label stays in the json as
            ``global_label``); otherwise labels are kept.
    """
    opts = opts or BuildOptions()
    src_dir = src.resolve()  # one generation of the source set, even if a build switches it meanwhile
    ss = shards.load(src_dir)
    keep = {c: i for i, c in enumerate(classes)}
    per_shard = opts.samples_per_shard(sum(ss.class_hist().get(c, 0) for c in classes))
    infos, batch, hist = [], [], {}
    with Staging(out) as stage:

        def flush() -> None:
            name = f"shard-{len(infos):06d}.tar"
            size, digest = write_tar(stage.dir / name, batch)
            infos.append(ShardInfo(name, len(batch), size, digest, dict(sorted(hist.items())), "", batch[0][0],
                                   batch[-1][0]))
            batch.clear()
            hist.clear()

        for key, parts, label in _filtered(src_dir, ss, keep, remap):
            batch.append((key, parts))
            hist[label] = hist.get(label, 0) + 1
            if len(batch) >= per_shard:
                flush()
        if batch:
            flush()
        names = [ss.classes[c] if c < len(ss.classes) else str(c) for c in classes]
        result = ShardSet(ss.dataset, ss.split, names if remap else ss.classes, infos, [],
                          {"subset_of": str(src), "classes": classes, "remapped": remap})
        shards.save(stage.dir, result)
        stage.publish()
    logger.info("subset of %s with %d classes: %d samples in %d shards -> %s", src, len(classes), result.num_samples,
                len(infos), out)
    return result
