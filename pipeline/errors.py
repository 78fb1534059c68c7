"""Errors of the offline stages that are not a video's fault (the id safety rule and
``MetadataError`` live in the dataset registry, ``tstl.core.datasets.base``).

Exit codes of ``python -m pipeline.cli`` (also in docs/pipeline.md):
0 done; 1 more videos failed than ``--max-failure-fraction`` allows; 2 bad input (metadata,
arguments); 3 environment error (disk full, read-only or forbidden folder, ffmpeg missing): fix it
and rerun, nothing was recorded against any video; 4 another run holds the dataset folder
(``--wait-lock`` queues instead).
"""

from __future__ import annotations

import errno
import os

from tstl.core import exitcodes

# the convention of every tool (tstl.core.exitcodes); 3 and 4 are the offline stages' extensions
EXIT_OK, EXIT_FAILURES, EXIT_BAD_INPUT, EXIT_ENVIRONMENT, EXIT_LOCKED = (
    exitcodes.OK, exitcodes.FAILED, exitcodes.USAGE, exitcodes.ENVIRONMENT, exitcodes.LOCKED)

ENV_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
# ffmpeg and pyarrow report these as text (ffmpeg's stderr, pyarrow's OSError without errno).
ENV_TEXTS = tuple(os.strerror(e) for e in sorted(ENV_ERRNOS))


class EnvironmentFault(Exception):
    """The machine, not the data, stopped the stage (full disk, read-only folder, no ffmpeg)."""


def is_environment_error(e: BaseException) -> bool:
    """True for OSErrors of the machine rather than of the data."""
    if isinstance(e, EnvironmentFault):
        return True
    if not isinstance(e, OSError):
        return False
    return e.errno in ENV_ERRNOS or any(text in str(e) for text in ENV_TEXTS)


def environment_text(text: str) -> str | None:
    """The environment error named in a tool's message (ffmpeg stderr), if any."""
    return next((t for t in ENV_TEXTS if t in text), None)
