"""The streaming loader end to end on tiny shard sets: balance, coverage, resume, bad samples,
views, sources."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tstl.data import BadSampleRateError, DataConfig, build_eval_loader, build_train_loader
from tstl.data.decode import BadSample, decode_clip

CFG = dict(num_frames=4, input_size=32, batch_size=2, eval_batch_size=4, num_workers=2,
           mixup=0.0, cutmix=0.0, min_bad_check=1000, max_bad_fraction=1.0)


def cfg(**kw) -> DataConfig:
    return DataConfig(**{**CFG, **kw})


def run(loader) -> list[dict]:
    return list(loader)


def keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def test_two_ranks_two_workers_equal_steps_and_exact_coverage(
        shardset: Callable[..., Path]) -> None:
    root = shardset(32, [3, 11, 9, 9])  # uneven shards; 32 = 2 ranks x 2 workers x 4 batches of 2
    for epoch in (0, 1):
        per_rank = [run(build_train_loader(cfg(), root, rank=r, world_size=2, epoch=epoch))
                    for r in range(2)]
        assert [len(b) for b in per_rank] == [8, 8]
        assert len(build_train_loader(cfg(), root, rank=1, world_size=2)) == 8
        seen = keys(per_rank[0]) + keys(per_rank[1])
        assert sorted(seen) == [f"v{i:03d}" for i in range(32)]  # every sample exactly once


def test_padding_rule_when_counts_do_not_divide(shardset: Callable[..., Path]) -> None:
    root = shardset(27, [5, 13, 9])
    per_rank = [run(build_train_loader(cfg(), root, rank=r, world_size=2)) for r in range(2)]
    # ceil(27 / (2 ranks x 2)) = 7 batches of 2 on each rank
    assert [len(b) for b in per_rank] == [7, 7]
    counts = Counter(keys(per_rank[0]) + keys(per_rank[1]))
    # one repeat
    assert set(counts) == {f"v{i:03d}" for i in range(27)} and sum(counts.values()) == 28
    dropped = [run(build_train_loader(cfg(), root, rank=r, world_size=2, balance="drop"))
               for r in range(2)]
    counts = Counter(keys(dropped[0]) + keys(dropped[1]))
    assert (len(dropped[0]) == len(dropped[1]) == 6 and max(counts.values()) == 1
            and len(counts) == 24)


def test_reproducible_and_reshuffled_per_epoch(shardset: Callable[..., Path]) -> None:
    root = shardset(16, [4, 4, 4, 4])
    a = run(build_train_loader(cfg(), root, epoch=3))
    b = run(build_train_loader(cfg(), root, epoch=3))
    assert keys(a) == keys(b)
    assert all(torch.equal(x["video"], y["video"]) for x, y in zip(a, b))
    c = run(build_train_loader(cfg(), root, epoch=4))
    assert keys(c) != keys(a) and sorted(keys(c)) == sorted(keys(a))


@pytest.mark.parametrize("stop", [3, 4])
def test_resume_mid_epoch_neither_replays_nor_skips(shardset: Callable[..., Path],
                                                    stop: int) -> None:
    root = shardset(24, [7, 9, 8])
    c = cfg(mixup=0.8, cutmix=1.0)
    full = run(build_train_loader(c, root, epoch=1))
    first = build_train_loader(c, root, epoch=1)
    head = []
    for batch in first:
        head.append(batch)
        if len(head) == stop:
            break
    state = first.state_dict()
    resumed = build_train_loader(c, root, epoch=0)
    resumed.load_state_dict(state)
    tail = run(resumed)
    got = head + tail
    assert len(got) == len(full) == len(resumed)
    assert keys(got) == keys(full)
    assert all(torch.equal(x["video"], y["video"]) and torch.equal(x["label"], y["label"])
               for x, y in zip(got, full))


def test_mixup_gives_soft_targets(shardset: Callable[..., Path], shardkit) -> None:
    batch = next(iter(build_train_loader(cfg(mixup=0.8, cutmix=1.0, num_workers=0),
                                         shardset(8, [8]))))
    assert (batch["label"].shape == (2, shardkit.num_classes)
            and torch.allclose(batch["label"].sum(1), torch.ones(2)))
    assert batch["video"].shape == (2, 3, 4, 32, 32)


def test_multiview_eval_keys_and_views(shardset: Callable[..., Path]) -> None:
    root = shardset(8, [3, 5])
    c = cfg(test_views=(2, 3))
    batches = [run(build_eval_loader(c, root, rank=r, world_size=2)) for r in range(2)]
    assert len(batches[0]) == len(batches[1]) == 6  # 2 videos x 6 views per worker, batches of 4
    pairs = Counter((k, int(v)) for bs in batches for b in bs for k, v in zip(b["key"], b["view"]))
    assert (set(pairs) == {(f"v{i:03d}", v) for i in range(8) for v in range(6)}
            and max(pairs.values()) == 1)
    views = {}
    for b in batches[0]:
        for k, v, x in zip(b["key"], b["view"], b["video"]):
            views[(k, int(v))] = x
    k = batches[0][0]["key"][0]
    assert not torch.equal(views[(k, 0)], views[(k, 2)])  # left and right crops differ
    assert not torch.equal(views[(k, 0)], views[(k, 3)])  # temporal views differ


def test_bad_samples_skipped_counted_quarantined(tmp_path: Path, videos: dict[int, bytes],
                                                 shardkit) -> None:
    sample, write_shardset, n_cls = shardkit.sample, shardkit.write, shardkit.num_classes
    good = [sample(f"g{i:02d}", i % n_cls, videos[12], 12) for i in range(14)]
    broken = sample("bad_bytes", 0, videos[12][:600] + b"\0" * 2000, 12)
    missing = sample("no_mp4", 1, videos[12], 12)
    del missing["mp4"]
    root = write_shardset(tmp_path / "s", good[:7] + [broken] + good[7:] + [missing], [8, 8])
    q = tmp_path / "quarantine.txt"
    per_rank = []
    for r in range(2):
        ld = build_train_loader(cfg(quarantine=str(q)), root, rank=r, world_size=2)
        per_rank.append(run(ld))
        assert len(per_rank[-1]) == len(ld) == 4
    got = set(keys(per_rank[0]) + keys(per_rank[1]))
    assert got == {s["__key__"] for s in good}
    assert (sorted(line.split("\t")[0] for line in q.read_text().splitlines())
            == ["bad_bytes", "no_mp4"])
    with pytest.raises(BadSampleRateError, match="max_bad_fraction"):
        run(build_train_loader(cfg(min_bad_check=1, max_bad_fraction=0.05, num_workers=0), root))


def test_frame_count_guard(videos: dict[int, bytes]) -> None:
    seen = []
    clip = decode_clip(videos[40], 10, lambda n: seen.append(n) or list(range(n)))
    assert seen == [10] and clip.shape[0] == 10  # json.frames caps what we read
    decode_clip(videos[12], 500, lambda n: seen.append(n) or [n - 1])
    assert seen[-1] == 12  # a json count beyond the stream is capped by the decoder
    with pytest.raises(BadSample):
        decode_clip(b"\0" * 4096, 10, lambda n: [0])


def test_sources_brace_pattern_and_pipe(shardset: Callable[..., Path]) -> None:
    root = shardset(12, [4, 4, 4])
    ref = sorted(keys(run(build_train_loader(cfg(), root))))
    brace = str(root / "shard-{000000..000002}.tar")
    assert sorted(keys(run(build_train_loader(cfg(), brace)))) == ref
    pipes = [f"pipe:cat {p}" for p in sorted(root.glob("*.tar"))]
    assert sorted(keys(run(build_eval_loader(cfg(test_views=(1, 1)), pipes)))) == ref


def test_reads_shard_sets_built_by_shard_tools(tmp_path: Path, videos: dict[int, bytes]) -> None:
    from shard_tools.build import BuildOptions, build_dataset

    root = tmp_path / "ssv2"
    (root / "videos").mkdir(parents=True)
    (root / "annotations").mkdir()
    for i in range(7):
        (root / "videos" / f"{i + 1}.mp4").write_bytes(videos[12 if i % 2 else 20])
    (root / "annotations/train.csv").write_text("".join(f"{i + 1}.mp4 {i % 3}\n" for i in range(7)))
    (root / "annotations/val.csv").write_text("1.mp4 0\n")
    (root / "annotations/classes.txt").write_text("a\nb\nc\n")
    build_dataset(tmp_path, "ssv2", 1, BuildOptions(max_samples=3, jobs=1))
    ld = build_train_loader(cfg(mixup=0.8), root / "shards/train", world_size=1)
    got = keys(run(ld))
    assert ld.num_classes == 3 and ld.classes == ["a", "b", "c"] and len(got) == 8
    assert set(got) == {str(i + 1) for i in range(7)}
    # counts from the manifest
    sub = build_train_loader(cfg(), root / "shards/train", label_map={2: 0, 0: 1})
    batches = run(sub)
    assert sub.num_classes == 2 and sorted(set(keys(batches))) == ["1", "3", "4", "6", "7"]
    # label 2 -> 0
    assert {k: int(v) for b in batches for k, v in zip(b["key"], b["label"])}["3"] == 0
    assert sub.classes == ["c", "a"]  # names follow the remapped order


def test_label_map_relabels_classes_to_groups(shardset: Callable[..., Path]) -> None:
    root = shardset(20, [9, 11])  # labels i % 5
    group_of = [1, 0, 2, 0, 1]  # class -> group, as TSTL's stage-1 selector is trained
    label_map = dict(enumerate(group_of))
    for loader in (build_train_loader(cfg(), root, label_map=label_map),
                   build_eval_loader(cfg(test_views=(1, 1)), root, label_map=label_map)):
        got = {k: int(v) for b in run(loader) for k, v in zip(b["key"], b["label"])}
        assert loader.num_classes == 3 and loader.classes is None
        assert got == {f"v{i:03d}": group_of[i % 5] for i in range(20)}
    mixed = next(iter(build_train_loader(cfg(mixup=0.8), root, label_map=label_map)))
    assert mixed["label"].shape == (2, 3)  # mixup targets over groups
    # an expert-style subset map: classes 4, 1 kept and relabelled 1, 0
    sub = build_train_loader(cfg(), root, label_map={4: 1, 1: 0})
    got = {k: int(v) for b in run(sub) for k, v in zip(b["key"], b["label"])}
    assert got == {f"v{i:03d}": {4: 1, 1: 0}[i % 5] for i in range(20) if i % 5 in (1, 4)}
    with pytest.raises(ValueError, match=r"label_map keys \[5\] are not classes"):
        build_train_loader(cfg(), root, label_map={0: 0, 5: 1})
    with pytest.raises(ValueError, match="every new label"):
        build_train_loader(cfg(), root, label_map=dict(enumerate([0, 2, 0, 2, 0])))


def test_label_filter_keeps_balance_and_coverage(shardset: Callable[..., Path]) -> None:
    # labels i % 5: 12 samples of labels 1 and 3, selected through the index
    root = shardset(30, [7, 13, 10])
    per_rank = [run(build_train_loader(cfg(), root, rank=r, world_size=2, label_map={1: 0, 3: 1}))
                for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 3  # 12 / (2 ranks x 2)
    got = Counter(keys(per_rank[0]) + keys(per_rank[1]))
    assert (set(got) == {f"v{i:03d}" for i in range(30) if i % 5 in (1, 3)}
            and sum(got.values()) == 12)


def test_http_source_through_shards_json(shardset: Callable[..., Path]) -> None:
    import functools
    import http.server
    import threading

    root = shardset(12, [5, 7])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shards.json"
        ld = build_train_loader(cfg(num_workers=1), url)
        assert sorted(keys(run(ld))) == [f"v{i:03d}" for i in range(12)] and ld.num_classes == 5
    finally:
        server.shutdown()
        server.server_close()


def test_iterating_again_starts_the_next_epoch(shardset: Callable[..., Path]) -> None:
    root = shardset(8, [8])
    ld = build_train_loader(cfg(num_workers=0), root, epoch=5)
    first = keys(run(ld))
    second = keys(run(ld))
    assert (ld.epoch == 6
            and second == keys(run(build_train_loader(cfg(num_workers=0), root, epoch=6))))
    assert sorted(first) == sorted(second) and first != second


def test_truncated_shard_counts_missing_samples_and_keeps_steps(shardset: Callable[..., Path],
                                                                tmp_path: Path) -> None:
    root = shardset(16, [8, 8])
    tar = root / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])  # a half-copied shard
    q = tmp_path / "q.txt"
    # Read through a pipe, as a remote shard would be: a local one of the wrong size is refused up
    # front (tests/data/test_shard_size.py).
    ld = build_train_loader(cfg(quarantine=str(q), shard_url_template=f"pipe:cat {root}/{{name}}"),
                            root)
    batches = run(ld)
    assert len(batches) == len(ld) == 8 and ld.bad_samples >= 4
    assert all(k in {f"v{i:03d}" for i in range(16)} for k in keys(batches))
    assert {f"v{i:03d}" for i in range(8)} <= set(keys(batches))
    assert len(q.read_text().splitlines()) == ld.bad_samples


def test_decode_guard_interrupts_a_stuck_call() -> None:
    import time

    from tstl.data.decode import _time_limit

    with pytest.raises(BadSample, match="longer than"), _time_limit(0.05):
        time.sleep(5)  # stands in for a decoder stuck on a broken stream
