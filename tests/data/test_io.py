"""What the loader reads, counted at a real local http server: each byte once, ranged, retried from
where it broke, cached per node, and only an expert's own samples; plus sets replaced under a run
and orphaned workers."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.data.conftest import procs_with
from tstl.core.shards import SAMPLES
from tstl.data import DataConfig, build_eval_loader, build_train_loader
from tstl.data.cache import NodeCache
from tstl.data.reader import ShardSetChanged

ROOT = Path(__file__).resolve().parents[2]
CFG = dict(num_frames=4, input_size=32, batch_size=2, eval_batch_size=4, num_workers=1, mixup=0.0,
           cutmix=0.0, min_bad_check=1000, max_bad_fraction=1.0)


def cfg(**kw) -> DataConfig:
    return DataConfig(**{**CFG, **kw})


def keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def stored(root: Path) -> int:
    return sum(p.stat().st_size for p in root.glob("*.tar"))


def test_ranged_reads_send_each_byte_once_with_more_slots_than_shards(shardset, serve) -> None:
    root = shardset(24, [10, 14])  # 2 shards, read by 2 ranks x 2 workers = 4 slots
    with serve(root) as srv:
        got = []
        for r in range(2):
            got += keys(build_train_loader(cfg(num_workers=2), srv.url + "/", rank=r, world_size=2))
        ratio = srv.shard_bytes() / stored(root)
        tar_requests = [rng for path, rng in srv.requests if path.endswith(".tar")]
    assert sorted(got) == [f"v{i:03d}" for i in range(24)]
    assert ratio <= 1.05 and all(rng and rng.startswith("bytes=") for rng in tar_requests), ratio


def test_a_body_cut_short_is_retried_from_the_sample_that_failed(shardset, serve) -> None:
    root = shardset(12, [12])
    size = (root / "shard-000000.tar").stat().st_size
    with serve(root) as srv:
        # the first answer stops half-way: Content-Length not met
        srv.cut["/shard-000000.tar"] = size // 2
        # evaluation reads in tar order, so its samples are fetched as one coalesced request
        ld = build_eval_loader(cfg(test_views=(1, 1), eval_batch_size=12, read_retries=2),
                               srv.url + "/")
        got = keys(ld)
        ranges = [rng for path, rng in srv.requests if path.endswith(".tar")]
    assert sorted(got) == [f"v{i:03d}" for i in range(12)] and ld.bad_samples == 0
    first, second = (int(r.split("=")[1].split("-")[0]) for r in ranges[:2])
    ix = ld.shardset.index
    # the failed sample's start
    assert first == 0 and second in set(ix.offset.tolist()) and 0 < second <= size // 2
    assert srv.shard_bytes() < 1.6 * size  # not re-read from byte 0


def test_pipe_template_with_range_fields_reads_ranges(shardset) -> None:
    root = shardset(12, [5, 7])
    template = (f"pipe:dd if={root}/{{name}} iflag=skip_bytes,count_bytes skip={{offset}} "
                "count={length} status=none")
    ld = build_train_loader(cfg(shard_url_template=template), root)
    assert sorted(keys(ld)) == [f"v{i:03d}" for i in range(12)] and ld.bad_samples == 0


def test_second_epoch_with_the_cache_reads_nothing_from_the_server(shardset, serve,
                                                                   tmp_path: Path) -> None:
    root = shardset(16, [8, 8])
    c = cfg(num_workers=2, cache_dir=str(tmp_path / "cache"))
    with serve(root) as srv:
        ld = build_train_loader(c, srv.url + "/")
        first = keys(ld)
        epoch1 = srv.shard_bytes()
        second = keys(ld)  # iterating again: epoch 1
    assert ld.epoch == 1 and sorted(first) == sorted(second) and first != second
    # epoch 2: 0 bytes from the server
    assert epoch1 <= 1.05 * stored(root) and srv.shard_bytes() == epoch1


def test_a_server_without_ranges_works_and_the_cache_streams_each_shard_once(
        shardset, serve, tmp_path: Path) -> None:
    root = shardset(16, [8, 8])
    c = cfg(num_workers=2, cache_dir=str(tmp_path / "cache"))
    with serve(root, ranges=False) as srv:
        ld = build_train_loader(c, srv.url + "/")
        assert sorted(keys(ld)) == [f"v{i:03d}" for i in range(16)]
        epoch1 = srv.shard_bytes()
        assert sorted(keys(ld)) == [f"v{i:03d}" for i in range(16)]
    biggest = max(p.stat().st_size for p in root.glob("*.tar"))
    # each shard streamed whole once per node, plus each worker's first ranged request, answered
    # whole (a real server sends only what fits the socket buffers before the reader hangs up; this
    # one counts whole bodies)
    assert stored(root) <= epoch1 <= stored(root) + 2 * biggest and srv.shard_bytes() == epoch1


def test_cache_eviction_keeps_the_limit_and_the_recent_entries(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path, "set-a", limit_bytes=10_000)
    for i in range(8):
        cache.put("s.tar", i * 1000, bytes(1000))
        time.sleep(0.01)
    assert cache.get("s.tar", 0, 1000) is not None  # used again: now the most recent
    for i in range(8, 16):
        cache.put("s.tar", i * 1000, bytes(1000))
        time.sleep(0.01)
    cache.evict()
    total = sum(p.stat().st_size for p in tmp_path.rglob("*")
                if p.is_file() and not p.name.startswith("."))
    assert (total <= 10_000 and cache.get("s.tar", 0, 1000) is not None
            and cache.get("s.tar", 1000, 1000) is None)
    assert cache.get("s.tar", 15_000, 999) is None  # the wrong length: dropped, never used


def test_a_full_cache_disk_degrades_to_reading_from_the_source(shardset, serve, tmp_path: Path,
                                                               monkeypatch, caplog) -> None:
    root = shardset(12, [6, 6])
    real = os.replace

    def full(src, dst):
        # the cache's rename is where a full disk shows (the write before it may buffer)
        if "cache" in str(dst):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", full)
    with serve(root) as srv, caplog.at_level(logging.WARNING):
        ld = build_train_loader(cfg(num_workers=0, cache_dir=str(tmp_path / "cache")),
                                srv.url + "/")
        got = keys(ld)
    assert sorted(got) == [f"v{i:03d}" for i in range(12)] and ld.bad_samples == 0
    warned = [r.getMessage() for r in caplog.records if "cannot write" in r.getMessage()]
    assert len(warned) == 1 and "No space left" in warned[0]


def test_elastic_resume_4_to_3_ranks_reads_only_the_rest(shardset, serve) -> None:
    root = shardset(48, [12, 12, 12, 12])
    c = cfg(num_workers=1)
    with serve(root) as srv:
        states = []
        for r in range(4):
            ld = build_train_loader(c, srv.url + "/", rank=r, world_size=4)
            for _ in ld:
                if ld.step == 3:
                    break
            states.append(ld.state_dict())
        before = srv.shard_bytes()
        for r in range(3):
            ld = build_train_loader(c, srv.url + "/", rank=r, world_size=3)
            ld.load_state_dicts(states)
            list(ld)
        after = srv.shard_bytes() - before
    order_rest = _rest_rows(ld, states[0]["position"])
    rest = int(ld.shardset.index.length[order_rest].sum())
    assert after <= 1.1 * rest, (after, rest)


def _rest_rows(ld, position: int) -> np.ndarray:
    from tstl.data.stream import StreamSpec

    spec = StreamSpec(ld.cfg, ld.shardset, True, 0, 1, ld.epoch, 1, len(ld))
    return spec.order()[position:]


def test_an_expert_reads_only_its_own_group(tmp_path: Path, videos, shardkit, serve) -> None:
    import json

    items = [shardkit.sample(f"s{i:03d}", i % 8, videos[12], 12) for i in range(64)]
    root = shardkit.write(tmp_path / "eight", items, [16, 16, 16, 16])
    meta = json.loads((root / "shards.json").read_text())  # 8 classes in this set
    meta.update(num_classes=8, classes=[f"c{k}" for k in range(8)])
    (root / "shards.json").write_text(json.dumps(meta))
    with serve(root) as srv:
        ld = build_train_loader(cfg(), srv.url + "/", label_map={2: 0, 5: 1})
        got = keys(ld)
    ix = ld.shardset.index
    own = int(ix.length[np.isin(ix.label, [2, 5])].sum())
    assert set(got) == {f"s{i:03d}" for i in range(64) if i % 8 in (2, 5)}
    assert srv.shard_bytes() <= 1.2 * own, (srv.shard_bytes(), own)


def test_a_shard_set_replaced_under_a_run_stops_it(shardset, tmp_path: Path, serve) -> None:
    root = shardset(8, [4, 4])
    ld = build_train_loader(cfg(num_workers=0), root)
    list(ld)
    (root / "shards.json").write_text(
        (root / "shards.json").read_text().replace('"test"', '"test2"'))
    with pytest.raises(ShardSetChanged, match="replaced while this run was reading it"):
        list(ld)
    # bytes that are not the sample the index names (a tar replaced in place, index kept)
    other = shardset(8, [4, 4], name="other")
    with serve(root) as srv:
        ld = build_train_loader(cfg(num_workers=0), srv.url + "/")
        (root / "shard-000000.tar").write_bytes((other / "shard-000001.tar").read_bytes())
        with pytest.raises(ShardSetChanged, match="the index says"):
            list(ld)


_TRAINER = textwrap.dedent("""
    import sys
    from tstl.data import DataConfig, build_train_loader
    root, template = sys.argv[1], sys.argv[2]
    cfg = DataConfig(num_frames=4, input_size=32, batch_size=2, num_workers=2, mixup=0.0,
                     cutmix=0.0, shard_url_template=template)
    for batch in build_train_loader(cfg, root):
        print("BATCH", flush=True)
""")


def test_workers_and_their_commands_end_with_a_killed_trainer(shardset) -> None:
    root = shardset(40, [20, 20])
    marker = "sleep 0.617"  # slows every ranged read; unique, to find what is left
    template = (f"pipe:{marker}; dd if={root}/{{name}} iflag=skip_bytes,count_bytes "
                "skip={offset} count={length} status=none")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _TRAINER, str(root), template], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().startswith("BATCH")
        ours = _descendants(proc.pid)
        assert len(ours) >= 2  # the two workers (and maybe a command)
        proc.kill()  # SIGKILL: nothing of the trainer's own code runs
        proc.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (_alive(ours) or procs_with(marker)):
            time.sleep(0.2)
        assert not _alive(ours) and not procs_with(marker), (_alive(ours), procs_with(marker))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _descendants(pid: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.add(k)
            todo.append(k)
    return out


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            if (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z":
                alive.add(pid)
    return alive


def test_a_set_without_index_is_indexed_once_and_says_how_to_save_that(tmp_path: Path, videos,
                                                                       shardkit, caplog) -> None:
    items = [shardkit.sample(f"k{i:02d}", i % 5, videos[12], 12) for i in range(8)]
    root = shardkit.write(tmp_path / "legacy", items, [4, 4], index=False)
    assert not (root / SAMPLES).exists()
    with caplog.at_level(logging.WARNING):
        got = keys(build_train_loader(cfg(), root))
    assert sorted(got) == sorted(s["__key__"] for s in items)
    assert any("tstl shards index" in r.getMessage() for r in caplog.records)


def test_the_same_epoch_from_a_folder_and_over_http(shardset, serve) -> None:
    """Keys and pixels are the same whatever the transport: reads do not change the data."""
    import torch

    root = shardset(10, [3, 7])
    local = list(build_train_loader(cfg(num_workers=0), root))
    with serve(root) as srv:
        over_http = list(build_train_loader(cfg(num_workers=0), srv.url + "/"))
    assert keys(local) == keys(over_http)
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(local, over_http))
