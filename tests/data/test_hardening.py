"""Loader hardening (issue 12 items 7-9, issue 13 item 6): bad labels, stalled remote sources, the
run-wide bad-sample limit on 2 gloo ranks, shard lists and manifests read over http / ``pipe:``."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.server
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.data.conftest import procs_with
from tstl.data import BadSampleRateError, DataConfig, build_eval_loader, build_train_loader
from tstl.data.sources import Shard, resolve

ROOT = Path(__file__).resolve().parents[2]
CFG = {"num_frames": 4, "input_size": 32, "batch_size": 2, "eval_batch_size": 4, "num_workers": 1,
       "mixup": 0.0, "cutmix": 0.0, "max_bad_fraction": 1.0}


def cfg(**kw) -> DataConfig:
    return DataConfig(**{**CFG, **kw})


def keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def quarantined(q: Path) -> dict[str, tuple[str, str]]:
    return {k: (shard, reason)
            for k, shard, reason in (line.split("\t") for line in q.read_text().splitlines())}


# ---- item 7: out-of-range labels -----------------------------------------------------------------
def test_out_of_range_labels_are_bad_samples_and_never_reach_mixup(
        tmp_path: Path, videos: dict[int, bytes], shardkit) -> None:
    sample, n_cls = shardkit.sample, shardkit.num_classes
    good = [sample(f"g{i:02d}", i % n_cls, videos[12], 12) for i in range(13)]
    bad = [sample("cls999", 999, videos[12], 12), sample("cls_minus1", -1, videos[12], 12),
           sample("cls5", n_cls, videos[12], 12)]  # 5 classes: label 5 is one past the last
    root = shardkit.write(tmp_path / "s", good[:6] + bad[:2] + good[6:] + bad[2:], [8, 8])
    q = tmp_path / "q.txt"
    # mixup on: before the fix, label 999 crashed the main process in the one-hot ("index 999 is out
    # of bounds")
    ld = build_train_loader(cfg(mixup=0.8, cutmix=1.0, quarantine=str(q)), root)
    batches = list(ld)
    assert len(batches) == len(ld) == 8 and ld.bad_samples == 3
    assert set(keys(batches)) == {s["__key__"] for s in good}
    assert all(b["label"].shape == (2, n_cls) for b in batches)
    got = quarantined(q)
    assert set(got) == {"cls999", "cls_minus1", "cls5"}
    assert got["cls999"] == ("shard-000000.tar", "label 999 outside the shard set's classes 0..4")
    assert got["cls5"][0] == "shard-000001.tar" and "label 5 outside" in got["cls5"][1]
    ev = build_eval_loader(cfg(test_views=(1, 1)), root)
    labels = {k: int(v) for b in ev for k, v in zip(b["key"], b["label"])}
    assert set(labels) == {s["__key__"] for s in good} and max(labels.values()) < n_cls
    # a label_map whose keys miss a sample's label: the label filter drops it (not in the subset,
    # not bad)
    sub = build_train_loader(cfg(quarantine=str(tmp_path / "q2.txt")), root, label_map={0: 0, 1: 1})
    assert {int(v) for b in sub for v in b["label"]} == {0, 1} and sub.bad_samples == 0


# ---- item 8: a stalled remote source -------------------------------------------------------------
@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Bound the test's own runtime (a hang would otherwise block the suite); no assertion on
    speed."""
    def fail(signum: int, frame: object) -> None:
        raise TimeoutError(f"the loader hung for {seconds} s on a stalled source")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_stalled_pipe_source_times_out_retries_and_leaves_no_process(shardset: Callable[..., Path],
                                                                     tmp_path: Path) -> None:
    root = shardset(16, [8, 8])
    marker = "sleep 613"  # a duration no other process uses, to find leftovers
    stalled = root / "shard-000001.tar"
    half = stalled.stat().st_size // 2
    shards = dataclasses.replace(resolve(root), shards=[
        Shard("shard-000000.tar", f"pipe:cat {root}/shard-000000.tar", 8),
        Shard("shard-000001.tar", f"pipe:sh -c 'head -c {half} {stalled}; {marker}'", 8)])
    q = tmp_path / "q.txt"
    c = cfg(quarantine=str(q), read_timeout_s=1.0, read_retries=1)
    try:
        with _deadline(120):
            for loader in (build_train_loader(c, shards),
                           build_eval_loader(c, shards, views=(1, 1))):
                batches = list(loader)
                assert len(batches) == len(loader)
                assert 2 <= loader.bad_samples < 8  # the samples after the stall point
                assert {f"v{i:03d}" for i in range(8)} <= set(keys(batches))
        reasons = {r for _, r in quarantined(q).values()}
        assert reasons and all("shard unreadable after 2 attempts: TimeoutError" in r
                               and "read_timeout_s" in r for r in reasons), reasons
        assert all(shard == "shard-000001.tar" for shard, _ in quarantined(q).values())
    finally:
        left = procs_with(marker)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not left, f"stalled source processes left behind: {left}"


def test_stalled_http_source_times_out_and_retries(shardset: Callable[..., Path],
                                                   tmp_path: Path) -> None:
    root = shardset(16, [8, 8])
    release = threading.Event()
    requests: list[str] = []

    class Stalling(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, directory=str(root), **kw)

        def do_GET(self) -> None:
            requests.append(self.path)
            if not self.path.endswith("shard-000001.tar"):
                return super().do_GET()
            data = (root / "shard-000001.tar").read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            release.wait(60)  # stops sending: the client must give up on its own

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    q = tmp_path / "q.txt"
    try:
        with _deadline(120):
            url = f"http://127.0.0.1:{server.server_address[1]}/shards.json"
            ld = build_train_loader(cfg(quarantine=str(q), read_timeout_s=1.0, read_retries=1), url)
            batches = list(ld)
    finally:
        release.set()
        server.shutdown()
        server.server_close()
    # the samples whose bytes lie past the stall point are bad (each tried twice); those before it
    # are read
    ix, half = ld.shardset.index, (root / "shard-000001.tar").stat().st_size // 2
    beyond = {ix.key[r].decode() for r in range(8, 16) if ix.offset[r] + ix.length[r] > half}
    assert len(batches) == len(ld) and ld.bad_samples == len(beyond) and 2 <= len(beyond) < 8
    assert (set(quarantined(q)) == beyond
            and {f"v{i:03d}" for i in range(16)} - beyond == set(keys(batches)))
    # every one: the first attempt and a retry
    assert requests.count("/shard-000001.tar") >= 2 * len(beyond)
    assert {shard for shard, _ in quarantined(q).values()} == {"shard-000001.tar"}
    assert all("after 2 attempts: TimeoutError" in r for _, r in quarantined(q).values())


# ---- item 9: the bad-sample limit over all ranks -------------------------------------------------
_RANK = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    from tstl.data import BadSampleRateError, DataConfig, build_train_loader
    rank, root, q = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", rank=rank, world_size=2)
    # the defaults of the issue: min_bad_check 50, far more than the 16 samples of the run
    cfg = DataConfig(num_frames=4, input_size=32, batch_size=2, num_workers=1, mixup=0.0,
                     cutmix=0.0, max_bad_fraction=0.05, quarantine=q)
    loader = build_train_loader(cfg, root, rank=rank, world_size=2)
    out = {"rank": rank, "steps": 0, "error": None}
    try:
        for _ in loader:
            out["steps"] += 1
    except BadSampleRateError as e:
        out["error"] = str(e)
    print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()
""")


@pytest.mark.multiproc
@pytest.mark.parametrize("broken", [6, 16], ids=["partly-broken", "all-broken"])
def test_two_ranks_fail_together_when_one_ranks_data_is_broken(
        tmp_path: Path, videos: dict[int, bytes], shardkit, broken: int) -> None:
    sample = shardkit.sample
    good = [sample(f"g{i:02d}", i % 5, videos[12], 12) for i in range(16 - broken)]
    bad = [sample(f"bad{i:02d}", 0, videos[12][:600] + b"\0" * 2000, 12) for i in range(broken)]
    root = shardkit.write(tmp_path / "s", good[:8] + bad + good[8:], [16])
    q = tmp_path / "quarantine.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, "-c", _RANK, str(r), str(root), str(q)], env=env,
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
            results.append(json.loads(out.split("RESULT ", 1)[1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    errors = [r["error"] for r in results]
    assert errors[0] is not None and errors[0] == errors[1], results
    assert results[0]["steps"] == results[1]["steps"]  # the same step on both ranks
    assert str(q) in errors[0] and "max_bad_fraction=0.05" in errors[0]
    if broken == 16:  # both ranks stop at their first batch (2 samples each)
        assert "rank(s) [0, 1] met a batch without a single decodable sample" in errors[0]
        assert "4 of 4 samples read on 2 rank(s) were bad" in errors[0] and results[0]["steps"] == 0
    else:
        # min_bad_check (50) is never reached: the end of the epoch decides, having seen every
        # sample
        assert f"{broken} of 16 samples" in errors[0] and len(q.read_text().splitlines()) == broken


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_limit_counts_all_workers_and_epochs_of_a_rank(
        shardset: Callable[..., Path], tmp_path: Path, videos: dict[int, bytes], shardkit) -> None:
    """Small workers: 2 workers reading 8 samples each, 1 bad each; min_bad_check 12 is reached only
    together."""
    sample = shardkit.sample
    items = [sample(f"g{i:02d}", i % 5, videos[12], 12) for i in range(14)]
    items[3] = sample("bad_a", 0, b"\0" * 2000, 12)
    items[12] = sample("bad_b", 0, b"\0" * 2000, 12)
    root = shardkit.write(tmp_path / "s", items, [8, 6])
    ok = build_train_loader(cfg(num_workers=2, max_bad_fraction=0.2, min_bad_check=12), root)
    assert len(list(ok)) == len(ok) and ok.bad_samples == 2  # 2 of 16 <= 20 %
    strict = build_train_loader(cfg(num_workers=2, max_bad_fraction=0.1, min_bad_check=12), root)
    with pytest.raises(BadSampleRateError,
                       match=r"2 of 1[2-6] samples read on 1 rank\(s\) were bad"):
        list(strict)


# ---- issue 13 item 6: shard lists and manifests over http and pipe: ------------------------------
@contextlib.contextmanager
def _serve(directory: Path) -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_shard_set_folder_over_http_with_label_counts_from_the_remote_manifest(
        shardset: Callable[..., Path], caplog: pytest.LogCaptureFixture) -> None:
    root = shardset(20, [9, 11])  # labels i % 5; the label filter reads the index, not the tars
    with _serve(root.parent) as base, caplog.at_level(logging.WARNING):
        # the folder, as TrainConfig.shard_dir gives it for an http data_dir
        url = f"{base}/{root.name}"
        full = build_train_loader(cfg(), url)
        assert (sorted(keys(list(full))) == [f"v{i:03d}" for i in range(20)]
                and full.num_classes == 5)
        sub = build_train_loader(cfg(), url + "/", label_map={4: 1, 1: 0})
        got = {k: int(v) for b in sub for k, v in zip(b["key"], b["label"])}
    assert got == {f"v{i:03d}": {4: 1, 1: 0}[i % 5] for i in range(20) if i % 5 in (1, 4)}
    assert sub.num_samples == 8 and not [r for r in caplog.records if "index" in r.getMessage()]


def test_template_reads_the_shard_list_with_dataset_and_split(
        shardset: Callable[..., Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shardset(12, [5, 7], name="ds/shards/train")
    template = f"pipe:cat {tmp_path}/{{dataset}}/shards/{{split}}/{{name}}"
    # what the trainer asks for: no local file at all
    nothing = tmp_path / "nothing/ds/shards/train"
    with caplog.at_level(logging.WARNING):
        ld = build_train_loader(cfg(shard_url_template=template), nothing)
        assert sorted(keys(list(ld))) == [f"v{i:03d}" for i in range(12)] and ld.num_classes == 5
        sub = build_eval_loader(cfg(shard_url_template=template, test_views=(1, 1)), nothing,
                                label_map={2: 0})
        assert sorted(keys(list(sub))) == ["v002", "v007"]
    assert not [r for r in caplog.records if "index" in r.getMessage()]
    with pytest.raises(FileNotFoundError, match=r"shards\.json: cannot read the shard list"):
        build_train_loader(cfg(shard_url_template=template, read_retries=0),
                           tmp_path / "nothing/ds/shards/val")
