"""The shard-set and class-group formats of the base layer: round trips, URL reading, and a cheap
import."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tstl.core import shards
from tstl.core.groups import ClassGroups, GroupFileError, load_groups, save_groups
from tstl.core.shards import ShardInfo, ShardSet, ShardSetError

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_formats_pulls_in_no_heavy_package() -> None:
    code = ("import sys, tstl.core.shards, tstl.core.groups; "
            "print(sorted(m for m in ('pyarrow', 'webdataset', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def _tar(path: Path, keys: list[str]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, key in enumerate(keys):
            for ext, data in (("cls", str(i % 2).encode()), ("json", b"{}"),
                              ("mp4", b"x" * (700 * i + 1))):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_save_load_and_read_index_round_trip(tmp_path: Path) -> None:
    _tar(tmp_path / "shard-000000.tar", ["1", "2", "3"])
    _tar(tmp_path / "shard-000001.tar", ["4"])
    infos = [ShardInfo("shard-000000.tar", 3, 100, "ab", {0: 2, 1: 1}, "p", "1", "3"),
             ShardInfo("shard-000001.tar", 1, 50, "cd", {1: 1}, "q", "4", "4")]
    ss = ShardSet("ssv2", "train", ["a", "b"], infos, ["x.mp4"], {"seed": 0})
    shards.save(tmp_path, ss)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".tar") == [
        shards.MANIFEST, shards.SAMPLES, shards.INDEX]
    assert (ss.samples is not None and ss.samples["rows"] == 4
            and ss.samples["name"] == shards.SAMPLES)
    assert shards.load(tmp_path) == ss and ss.class_hist() == {0: 2, 1: 2} and ss.num_classes == 2
    index = json.loads((tmp_path / shards.INDEX).read_text())
    assert (index["num_samples"] == 4 and index["num_shards"] == 2
            and index["format"] == shards.FORMAT)
    assert (tmp_path / shards.INDEX).read_bytes() == shards.index_bytes(ss)
    # no manifest: histograms and plan hashes stay empty
    light = shards.read_index(tmp_path / shards.INDEX)
    assert [(s.name, s.samples, s.bytes, s.sha256) for s in light.shards] == [
        (s.name, s.samples, s.bytes, s.sha256) for s in ss.shards]
    # the URL path, through webdataset
    piped = shards.read_index(f"pipe:cat {tmp_path / shards.INDEX}")
    assert piped.shards == light.shards and piped.classes == ["a", "b"]
    assert set(shards.read_manifest(tmp_path / shards.MANIFEST)) == {
        "shard-000000.tar", "shard-000001.tar"}
    assert shards.sibling("http://h/x/shards.json", "a.tar") == "http://h/x/a.tar"
    assert (shards.is_local("/d/a.tar") and not shards.is_local("pipe:cat a")
            and not shards.is_local("https://h/a"))
    (tmp_path / shards.INDEX).write_text("{}")
    with pytest.raises(ShardSetError, match="not a valid shards.json.*make shards"):
        shards.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="tstl shards build"):
        shards.load(tmp_path / "nothing")


def test_group_files_live_in_the_base_layer(tmp_path: Path) -> None:
    import tstl.twostage.groups as generation

    g = ClassGroups(((2, 0), (1,)), 3)
    for fmt in ("ours", "tstl"):
        save_groups(g, tmp_path / f"{fmt}.json", fmt)
        assert load_groups(tmp_path / f"{fmt}.json") == g
    # one owner
    assert generation.ClassGroups is ClassGroups and generation.load_groups is load_groups
    (tmp_path / "bad.json").write_text(json.dumps({"format": "tstl-groups/v1", "num_classes": 3,
                                                   "groups": [[0, 1]]}))
    with pytest.raises(GroupFileError, match=r"bad.json: classes \[2\] are in no group"):
        load_groups(tmp_path / "bad.json")


def test_the_sample_index_locates_every_record(tmp_path: Path) -> None:
    """Each row's [offset, offset + length) is exactly its sample's members: a reader needs nothing
    else."""
    from tstl.data.reader import parse_record

    _tar(tmp_path / "shard-000000.tar", ["a", "b", "c"])
    _tar(tmp_path / "shard-000001.tar", ["d", "e"])
    ss = ShardSet("t", "train", ["x", "y"], [ShardInfo("shard-000000.tar", 3, -1, ""),
                                             ShardInfo("shard-000001.tar", 2, -1, "")])
    shards.save(tmp_path, ss)
    index = shards.parse_samples((tmp_path / shards.SAMPLES).read_bytes(), shards.load(tmp_path),
                                 "test")
    assert (index.key.tolist() == [b"a", b"b", b"c", b"d", b"e"]
            and index.shard.tolist() == [0, 0, 0, 1, 1])
    assert index.label.tolist() == [0, 1, 0, 0, 1] and index.counts(2) == [3, 2]
    for row in range(5):
        raw = (tmp_path / ss.shards[int(index.shard[row])].name).read_bytes()
        record = raw[index.offset[row]:index.offset[row] + index.length[row]]
        key, parts = parse_record(record)
        assert key == index.key[row].decode() and sorted(parts) == ["cls", "json", "mp4"]
    # the index names its own checksum: a stale copy is refused with the fix
    stale = shards.load(tmp_path)
    stale.samples = {**stale.samples, "sha256": "0" * 64}
    with pytest.raises(ShardSetError, match="tstl shards index"):
        shards.parse_samples((tmp_path / shards.SAMPLES).read_bytes(), stale, "test")
