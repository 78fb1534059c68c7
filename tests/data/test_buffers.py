"""Reused shared-memory batch buffers (``tstl.data.buffers``): the worker's pool, the training
process' returns, and the loader with real workers giving exactly the batches it gives without
reuse."""

from __future__ import annotations

import queue
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from tstl.data import DataConfig, build_eval_loader, build_train_loader
from tstl.data import loader as loader_mod
from tstl.data.buffers import Link, Pool, Returns, _Lent, _received

LOADER = dict(num_frames=4, input_size=32, batch_size=2, eval_batch_size=3, num_workers=1,
              prefetch_factor=2, min_bad_check=1000)


def _clips(value: int, n: int = 2) -> list[torch.Tensor]:
    return [torch.full((4, 8, 8, 3), value + i, dtype=torch.uint8) for i in range(n)]


def test_pool_reuses_returned_buffers_and_falls_back_when_full() -> None:
    link = Link("test", [queue.SimpleQueue()])
    pool = Pool(link, 0, max_buffers=2)
    a, b = pool.collate(_clips(1)), pool.collate(_clips(3))
    assert isinstance(a, _Lent) and isinstance(b, _Lent) and (a.args[3], b.args[3]) == (0, 1)
    assert a.args[0].is_shared() and torch.equal(a.args[0][1], _clips(1)[1])
    # nothing returned yet and the pool is full: a fresh, untracked buffer
    full = pool.collate(_clips(5))
    assert isinstance(full, torch.Tensor) and full.is_shared() and int(full[0, 0, 0, 0, 0]) == 5
    link.queues[0].put(0)  # the training process is done with slot 0
    c = pool.collate(_clips(7))
    assert isinstance(c, _Lent) and c.args[3] == 0 and pool.reused == 1
    assert c.args[0].data_ptr() == a.args[0].data_ptr() and int(c.args[0][0, 0, 0, 0, 0]) == 7
    # another shape (a short last batch) never takes a buffer of the wrong size
    odd = pool.collate(_clips(9, n=1))
    assert isinstance(odd, torch.Tensor) and odd.shape[0] == 1
    # no workers: a plain stack
    assert torch.equal(Pool(None, 0, 2).collate(_clips(1)), torch.stack(_clips(1)))


def test_returns_only_hand_back_buffers_whose_storage_died() -> None:
    ret = Returns(roles=2)
    try:
        t = torch.zeros(3)
        view = t[1:]
        assert _received(t, ret.token, 1, 4) is t
        del t
        ret.poll()
        assert ret.link.queues[1].empty() and ret.returned == 0  # a view still holds the memory
        del view
        ret.poll()
        assert ret.link.queues[1].get() == 4 and ret.returned == 1 and ret.link.queues[0].empty()
    finally:
        ret.close()
    # after close: passed through, not watched
    assert _received(torch.zeros(1), ret.token, 0, 0).shape == (1,)


class _Recording(Returns):
    made: ClassVar[list[Returns]] = []

    def __init__(self, roles: int) -> None:
        super().__init__(roles)
        _Recording.made.append(self)


def _run(root: Path, cfg: DataConfig, reuse: bool, monkeypatch: pytest.MonkeyPatch,
         train: bool = True, keep_raw: bool = False) -> list[dict]:
    _Recording.made = []
    monkeypatch.setattr(loader_mod, "Returns", _Recording if reuse else (lambda roles: None))
    ld = build_train_loader(cfg, root, epoch=1) if train else build_eval_loader(cfg, root)
    if keep_raw:
        ld._stages = lambda: []  # the raw uint8 batches, as the workers hand them over
    return list(ld)


@pytest.mark.parametrize("train", [True, False])
def test_reused_buffers_give_the_same_batches(shardset: Callable[..., Path],
                                              monkeypatch: pytest.MonkeyPatch, train: bool) -> None:
    root = shardset(24, [8, 8, 8])
    cfg = DataConfig(**LOADER)
    plain = _run(root, cfg, False, monkeypatch, train)
    reused = _run(root, cfg, True, monkeypatch, train)
    # all but those in flight at the end came back
    assert sum(r.returned for r in _Recording.made) >= len(reused) - 4
    assert len(plain) == len(reused) >= 12
    for p, r in zip(plain, reused):
        assert (p["key"] == r["key"] and torch.equal(p["video"], r["video"])
                and torch.equal(p["label"], r["label"]))


def test_batches_held_by_the_consumer_are_never_overwritten(
        shardset: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeping every raw uint8 batch alive: no buffer can come back, so the worker falls back to
    fresh buffers and every held batch keeps the contents it was sent with."""
    root = shardset(24, [8, 8, 8])
    cfg = DataConfig(**LOADER)
    plain = _run(root, cfg, False, monkeypatch, keep_raw=True)
    held = _run(root, cfg, True, monkeypatch, keep_raw=True)
    assert sum(r.returned for r in _Recording.made) == 0
    assert all(torch.equal(p["video"], h["video"]) for p, h in zip(plain, held)) and len(held) == 12


def test_small_shared_memory_is_named_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    from tstl.data import buffers

    monkeypatch.setattr(buffers.shutil, "disk_usage",
                        lambda p: type("U", (), {"total": 64 * 2**20})())
    assert not buffers.check_room(workers=4, buffers=5, batch_bytes=19 * 2**20)
    assert "--shm-size=1g" in caplog.text and "data.num_workers" in caplog.text
    assert buffers.check_room(workers=1, buffers=2, batch_bytes=2**20)
    monkeypatch.setattr(buffers.shutil, "disk_usage",
                        lambda p: (_ for _ in ()).throw(FileNotFoundError(p)))
    # no /dev/shm: nothing to say
    assert buffers.check_room(workers=4, buffers=5, batch_bytes=19 * 2**20)
