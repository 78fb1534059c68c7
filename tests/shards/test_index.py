"""``tstl shards index``: a set built before the per-sample index gets one, as a new generation,
without a tar rewritten; a remote set is indexed into --out; ``verify`` checks the index against the
tars."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from shard_tools.cli import main as shards_main
from shard_tools.verify import verify
from tests.data.conftest import make_mp4, sample, write_shardset
from tstl.core import shards as fmt
from tstl.data import DataConfig, build_train_loader

CFG = DataConfig(num_frames=4, input_size=32, batch_size=2, num_workers=0, mixup=0.0, cutmix=0.0)


def _legacy(tmp_path: Path) -> Path:
    """A set as 0.2 wrote it: tars, shards.json and no samples.parquet, behind the generation
    symlink."""
    vid = make_mp4(tmp_path / "v.mp4", 12, 5)
    items = [sample(f"k{i:02d}", i % 5, vid, 12) for i in range(10)]
    gen = write_shardset(tmp_path / "ds/shards/.train.gen-0123456789abcdef", items, [4, 6],
                         index=False)
    os.symlink(gen.name, tmp_path / "ds/shards/train")
    return tmp_path / "ds/shards/train"


def test_index_in_place_is_a_new_generation_with_the_same_tars(tmp_path: Path, caplog) -> None:
    link = _legacy(tmp_path)
    old_gen = link.resolve()
    inodes = {p.name: p.stat().st_ino for p in old_gen.glob("*.tar")}
    assert shards_main(["index", str(link)]) == 0
    new_gen = link.resolve()
    assert new_gen != old_gen and not old_gen.exists() and (new_gen / fmt.SAMPLES).exists()
    # hard links: no tar rewritten
    assert {p.name: p.stat().st_ino for p in new_gen.glob("*.tar")} == inodes
    ss = fmt.load(link)
    assert ss.samples["rows"] == 10 and not _index_errors(link)
    with caplog.at_level(logging.WARNING):
        keys = [k for b in build_train_loader(CFG, link) for k in b["key"]]
    assert sorted(keys) == [f"k{i:02d}" for i in range(10)]
    assert not [r for r in caplog.records if "index" in r.getMessage()]  # read from samples.parquet
    # already indexed: no change
    assert shards_main(["index", str(link)]) == 0 and link.resolve() == new_gen


def test_index_a_served_set_into_out(tmp_path: Path, serve) -> None:
    link = _legacy(tmp_path)
    out = tmp_path / "out"
    with serve(link.resolve()) as srv:
        assert shards_main(["index", srv.url + "/", "--out", str(out)]) == 0
    meta = json.loads((out / fmt.INDEX).read_text())
    assert (meta["samples"]["rows"] == 10
            and (out / fmt.SAMPLES).stat().st_size == meta["samples"]["bytes"])
    # published beside the set, a loader reads it from there
    gen = link.resolve()
    for name in (fmt.SAMPLES, fmt.INDEX):
        (gen / name).write_bytes((out / name).read_bytes())
    assert fmt.load(link).samples == meta["samples"]
    # a remote set cannot be indexed in place
    assert shards_main(["index", "http://127.0.0.1:9/x"]) == 2


def test_verify_finds_an_index_that_does_not_match_its_tars(tmp_path: Path) -> None:
    vid = make_mp4(tmp_path / "v.mp4", 12, 5)
    root = write_shardset(tmp_path / "s", [sample(f"k{i}", i % 5, vid, 12) for i in range(6)],
                          [3, 3])
    assert not _index_errors(root)
    other = write_shardset(tmp_path / "o", [sample(f"j{i}", i % 5, vid, 12) for i in range(6)],
                           [3, 3])
    (root / fmt.SAMPLES).write_bytes((other / fmt.SAMPLES).read_bytes())
    assert any("tstl shards index" in e for e in _index_errors(root))


def _index_errors(root: Path) -> list[str]:
    """What ``verify`` says of the index (the fixture's tars carry no sha256, so their own rows are
    skipped)."""
    return [e for r in verify(root, decode=False) if r.name == f"({fmt.SAMPLES})" for e in r.errors]
