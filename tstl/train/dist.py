"""Process-group set-up and the few collective helpers the trainer needs (NCCL on GPUs, gloo
on CPU)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from tstl.train.waits import note_waits, rendezvous

logger = logging.getLogger(__name__)

LAUNCHERS = ("deepspeed.launcher", "bin/deepspeed", "torch.distributed.run", "bin/torchrun")
"""Words in the command line of a launcher process (DeepSpeed's runner and its per-node launch.py,
torchrun)."""


def init() -> torch.device:
    """Join the process group the launcher (deepspeed/torchrun) describes; a single process needs no
    launcher.

    A rank started by a launcher stops (as on SIGTERM: at the next safe point, with a checkpoint)
    when the launcher dies, also by SIGKILL, so that no rank trains on as an orphan (issue 21;
    ``stop_with_launcher``).
    """
    stop_with_launcher()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # a single process without a launcher: any free local port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    import deepspeed

    _skip_shm_op(deepspeed)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend, device = "nccl", torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    else:
        backend, device = "gloo", torch.device("cpu")
    if not dist.is_initialized():
        with note_waits("joining the process group", otherwise=rendezvous()):  # no silent wait
            deepspeed.init_distributed(dist_backend=backend)
    return device


def launchers() -> list:
    """The launcher processes above this one (``psutil.Process``, nearest first), up to the first
    other process (a shell, slurmstepd, init): DeepSpeed's ``launch.py`` and the runner that started
    it, or torchrun."""
    import psutil

    found = []
    for proc in psutil.Process().parents():
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            break
        if not any(word in cmd for word in LAUNCHERS):
            break
        found.append(proc)
    return found


_watching = False


def stop_with_launcher(poll_s: float = 1.0) -> None:
    """Send this process SIGTERM when one of its launchers is gone (a daemon thread polls them every
    ``poll_s``).

    DeepSpeed's runner and ``launch.py`` forward SIGTERM/SIGINT to the ranks, but a SIGKILL of
    either leaves the ranks running with nobody to wait for them; ``PR_SET_PDEATHSIG`` would only
    watch the nearest of the two.
    """
    import psutil

    global _watching
    watched = [] if _watching else launchers()
    if not watched:
        return
    _watching = True

    def gone(proc) -> bool:
        try:
            return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    def watch() -> None:
        while not any(gone(p) for p in watched):
            time.sleep(poll_s)
        logger.warning("the launcher is gone (pid %s): stopping at the next safe point",
                       ", ".join(str(p.pid) for p in watched if gone(p)))
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def _skip_shm_op(deepspeed: Any) -> None:
    """Keep DeepSpeed from JIT-building and starting its shared-memory all-reduce op
    (``deepspeed_shm_comm``).

    DeepSpeed's torch backend builds that op whenever its accelerator has one, i.e. on every CPU run
    (``deepspeed/comm/torch.py``, ``build_shm_op``), although only ``inference_all_reduce``
    (DeepSpeed-Inference tensor parallelism) uses it; training reduces through torch.distributed
    (gloo). The build (minutes of g++) holds a file lock in ``TORCH_EXTENSIONS_DIR`` that a killed
    build leaves behind, so every later run waited on it without a word (issue 21); and with all
    ranks on one host each rank creates
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` (~65 MB;
    ``csrc/cpu/comm/shm.cpp``, ``shm_initialize``) that nothing ever unlinks. DeepSpeed 0.19 has no
    run-time switch (``DS_BUILD_SHM_COMM`` only pre-builds at install); ``build_shm_op`` asks
    ``deepspeed.ops.__compatible_ops__``, a dict probed once and cached so that edits persist
    (``deepspeed/ops/__init__.py``): marking the op incompatible there skips the build, the lock and
    the buffers. No accelerator's training path needs it.
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().create_op_builder("ShareMemCommBuilder") is None:
        return  # (CUDA) no such op: leave DeepSpeed's op probe for what asks for it
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (pickled; for small evaluation results)."""
    if not dist.is_initialized() or world() == 1:
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0, in rank order; None on the other ranks (for results only rank
    0 writes)."""
    if not dist.is_initialized() or world() == 1:
        return [obj]
    out: list[Any] | None = [None] * world() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (so all ranks take the same branch)."""
    if not dist.is_initialized() or world() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_max(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum of ``values`` over all ranks, in one collective (flags that every rank
    must agree on)."""
    if not dist.is_initialized() or world() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def broadcast_object(obj: Any = None, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; for small decisions)."""
    if not dist.is_initialized() or world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and return its result on every rank.

    An exception on rank 0 is raised on every rank, so no rank is left waiting at the next
    collective; rank 0 decides once for everybody (e.g. which stages are finished, even where ranks'
    views of a shared filesystem differ).
    """
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as e:
            error = e
    ok, payload = broadcast_object(
        (error is None, result if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if not ok:
        raise RuntimeError(f"rank 0 failed: {payload}")
    return payload
