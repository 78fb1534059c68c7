"""The loader refuses a local shard whose size disagrees with ``shards.json`` (issue 12, item 6)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tstl.core.shards import ShardSetError
from tstl.data import DataConfig, build_train_loader
from tstl.data.sources import resolve


def test_half_copied_local_shard_is_refused_naming_it_and_the_fix(
        shardset: Callable[..., Path]) -> None:
    root = shardset(16, [8, 8])
    assert resolve(root).num_samples == 16
    tar = root / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with pytest.raises(ShardSetError, match=r"shard-000001\.tar: \d+ bytes, "
                                            r".*shards\.json says \d+.*`make shards`"):
        build_train_loader(DataConfig(num_workers=0), root)
    with pytest.raises(ShardSetError, match="shard-000001.tar"):
        resolve(root / "shards.json")
    tar.unlink()
    with pytest.raises(ShardSetError,
                       match=r"shard-000001\.tar: listed in .* cannot be read.*`make shards`"):
        resolve(root)
