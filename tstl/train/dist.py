"""Process-group set-up and the few collective helpers the trainer needs (NCCL on GPUs, gloo on CPU)."""

from __future__ import annotations

import os
import socket
from typing import Any

import torch
import torch.distributed as dist


def init() -> torch.device:
    """Join the process group the launcher (deepspeed/torchrun) describes; a single process needs no launcher."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # a single process without a launcher: any free local port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend, device = "nccl", torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    else:
        backend, device = "gloo", torch.device("cpu")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    return device


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


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (so all ranks take the same branch)."""
    if not dist.is_initialized() or world() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
