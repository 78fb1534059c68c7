"""One logging set-up for every entry point: per-module loggers, rank-aware formatting."""

from __future__ import annotations

import logging
import os
import sys


class _TqdmHandler(logging.StreamHandler):
    """Writes through ``tqdm.write``, which clears the progress bars, prints the line and redraws
    them, so log lines never break a bar (the same as
    ``tqdm.contrib.logging.logging_redirect_tqdm``, for every entry point)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm  # here, not at module level: tstl.core stays cheap to import

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def init_logging(level: int | str = logging.INFO, rank: int | None = None) -> None:
    """Configure the root logger once. Non-zero ranks log warnings and errors only.

    Args:
        level: log level for rank 0 (or for a single process).
        rank: distributed rank; read from ``RANK`` when not given.
    """
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    prefix = f"[rank{rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    handler = _TqdmHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if rank == 0 else logging.WARNING)
