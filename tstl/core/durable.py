"""Durable file updates: what survives a power loss, for every writer that publishes files.

A rename is atomic but not durable until the folder holding it is fsynced, and a file's pages
reach the disk only when it is fsynced itself; shard sets (``shards.py``), the shard-set switch
(``shard_tools/publish.py``) and training checkpoints (``tstl/train/checkpoint.py``) all publish
that way, so the two system calls live here once. Written by hand: ``os`` has the calls but no
helper that orders them.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make the names in ``folder`` (new files, renames) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_fsynced(tmp: Path, path: Path) -> None:
    """fsync the finished file ``tmp``, then rename it to ``path`` (atomic on one file system)."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_durable(path: Path, text: str) -> None:
    """``path`` with ``text``, replaced atomically, the temp file fsynced before the rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
