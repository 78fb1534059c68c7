"""Shared-memory batch buffers that a DataLoader worker reuses once the training process has let go
of them.

Why our own: in a worker, ``default_collate`` stacks every batch into a *fresh* shared-memory
tensor, and the first write to each 4 KiB page of it is a kernel page fault (a shmem page allocated
and zeroed): measured in isolation on the 2-core reference machine, writing a 19 MB batch (8 clips
of 16 x 224 x 224 x 3 uint8) into fresh shared memory took 26 ms against 10 ms into memory already
touched; in the loader benchmark reuse makes the device-side worker 1.03-1.09x as fast. PyTorch
cannot reuse that memory because a worker never learns when the training process is done with a
batch. Here it does: the training process watches each received buffer with a storage-level weak
reference (``StorageWeakRef``, what ``torch.multiprocessing`` uses for its own cache) and, once no
tensor of the process references that memory any more (the batch was pinned or copied to the GPU,
normalised into a new tensor, or dropped), sends the buffer's slot number back to its worker over a
small queue; the worker stacks a later batch into that buffer instead of a new one.

Safety: a buffer is written again only after the training process' storage of it has died, so no
tensor there can see new contents. A worker keeps at most ``max_buffers`` buffers; when none is free
(the consumer holds on to its batches) it stacks into a fresh, untracked buffer, which is PyTorch's
behaviour.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import threading
from dataclasses import dataclass, field

import torch
import torch.multiprocessing as mp
from torch.multiprocessing.reductions import StorageWeakRef

logger = logging.getLogger(__name__)

_OPEN: dict[str, Returns] = {}
"""Return channels of this (training) process by token: where a received buffer finds its way
back."""
_COUNTER = itertools.count()
BUFFERS_EXTRA = 3
"""Buffers a worker tracks beyond ``prefetch_factor``: the one being filled and two the training
process may hold."""


@dataclass
class Link:
    """What the workers get (picklable at worker start): the channel's token and one return queue
    per role."""

    token: str
    queues: list = field(repr=False)


class Returns:
    """Training-process side: watches received buffers and hands the dead ones back to their
    workers.

    Args:
        roles: worker roles of one iteration (one queue each).
    """

    def __init__(self, roles: int) -> None:
        self.token = f"{os.getpid()}-{next(_COUNTER)}"
        self.link = Link(self.token, [mp.SimpleQueue() for _ in range(roles)])
        self._watched: list[tuple[StorageWeakRef, int, int]] = []
        self._lock = threading.Lock()  # buffers arrive in the pin-memory thread when it runs
        self.returned = 0
        _OPEN[self.token] = self

    def watch(self, tensor: torch.Tensor, role: int, slot: int) -> None:
        """Remember a received buffer (called when it is unpickled)."""
        with self._lock:
            self._watched.append((StorageWeakRef(tensor.untyped_storage()), role, slot))

    def poll(self) -> None:
        """Send every buffer whose storage has died in this process back to its worker."""
        with self._lock:
            alive = [not w[0].expired() for w in self._watched]
            dead = [w for w, a in zip(self._watched, alive) if not a]
            self._watched = [w for w, a in zip(self._watched, alive) if a]
        for _, role, slot in dead:
            self.link.queues[role].put(slot)
        self.returned += len(dead)

    def close(self) -> None:
        """End of the iteration: buffers arriving later are no longer watched; the queues are
        closed."""
        _OPEN.pop(self.token, None)
        for q in self.link.queues:
            q.close()


def _received(tensor: torch.Tensor, token: str, role: int, slot: int) -> torch.Tensor:
    """Unpickling a lent buffer in the training process: the plain tensor, watched by its channel if
    still open."""
    channel = _OPEN.get(token)
    if channel is not None:
        channel.watch(tensor, role, slot)
    return tensor


class _Lent:
    """A pooled buffer on its way to the training process (becomes the plain tensor there, see
    ``_received``)."""

    def __init__(self, tensor: torch.Tensor, token: str, role: int, slot: int) -> None:
        self.args = (tensor, token, role, slot)

    def __reduce__(self) -> tuple:
        return _received, self.args


class Pool:
    """Worker side: batch buffers in shared memory, reused when the training process returns them.

    Args:
        link: the channel's ``Link``; None (no workers, or reuse off) makes ``collate`` a plain
            ``torch.stack``.
        role: this worker's role (its return queue).
        max_buffers: most buffers tracked at once; enough for the batches in flight (DataLoader
            prefetch, the one being built and the ones the training process still holds).
    """

    def __init__(self, link: Link | None, role: int, max_buffers: int) -> None:
        self.link, self.role, self.max_buffers = link, role, max_buffers
        self.buffers: list[torch.Tensor] = []
        self.free: list[int] = []
        self.reused = 0

    def _drain(self) -> None:
        q = self.link.queues[self.role]
        while not q.empty():
            self.free.append(q.get())

    def _take(self, shape: torch.Size, dtype: torch.dtype) -> int:
        """A free buffer of ``shape`` (slot number), a new tracked one, or -1 when the pool is
        full."""
        self._drain()
        for i, slot in enumerate(self.free):
            if self.buffers[slot].shape == shape and self.buffers[slot].dtype == dtype:
                del self.free[i]
                self.reused += 1
                return slot
        if len(self.buffers) < self.max_buffers:
            self.buffers.append(_shared(shape, dtype))
            return len(self.buffers) - 1
        return -1

    def collate(self, clips: list[torch.Tensor]) -> torch.Tensor | _Lent:
        """Stack equal-shaped tensors into a batch; in a worker into a reused shared-memory
        buffer."""
        if self.link is None:
            return torch.stack(clips)
        shape = torch.Size((len(clips), *clips[0].shape))
        slot = self._take(shape, clips[0].dtype)
        if slot < 0:
            return torch.stack(clips, out=_shared(shape, clips[0].dtype))
        torch.stack(clips, out=self.buffers[slot])
        return _Lent(self.buffers[slot], self.link.token, self.role, slot)


def _shared(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory (allocated as ``default_collate`` does in a
    worker)."""
    nbytes = shape.numel() * torch.empty(0, dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes), 0, shape)


def check_room(workers: int, buffers: int, batch_bytes: int, shm: str = "/dev/shm") -> bool:
    """Warn (once per call) when ``shm`` is too small for the workers' batch buffers; False then.

    Containers often mount a 64 MB ``/dev/shm``; the DataLoader then dies with a bus error or "No
    space left on device" deep in a worker. Saying so up front names the fix.
    """
    try:
        total = shutil.disk_usage(shm).total
    except OSError:
        return True  # no such mount (not Linux): nothing to check
    need = workers * buffers * batch_bytes
    if total >= need:
        return True
    logger.warning("%s holds %.0f MB but %d loader worker(s) may keep up to %d batch buffers of "
                   "%.0f MB each there (%.0f MB); workers may crash with a bus error. Give the "
                   "container more shared memory (docker run --shm-size=%dg) or lower "
                   "data.num_workers / data.prefetch_factor / data.batch_size", shm, total / 2**20,
                   workers, buffers, batch_bytes / 2**20, need / 2**20, -(-need // 2**30))
    return False
