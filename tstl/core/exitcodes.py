"""The exit-code convention of every command-line tool (``tstl ...``, ``python -m ...``, the Make
targets).

=====  =============================================================================================
code   meaning
=====  =============================================================================================
0      done
1      the run failed (too many broken videos, shards that do not verify, an error inside training)
2      usage, config or input error: the message names what is wrong and the fix; nothing expensive
       has run
3      environment error (disk full, read-only or forbidden folder, no ffmpeg): fix the machine and
       rerun
4      another run holds the dataset folder (``--wait-lock`` waits instead)
75     training was preempted (SIGTERM/SIGUSR1) after saving a checkpoint: rerun the same command to
       resume
=====  =============================================================================================

3 and 4 are the offline stages' extensions, 75 (``EX_TEMPFAIL``) the trainer's. argparse's own usage
errors exit 2 as well. Every CLI reports a code-2 error on stderr as
``error: <what is wrong> (<the fix>)`` without a traceback.
"""

from __future__ import annotations

import sys
from typing import TextIO

OK = 0
FAILED = 1
USAGE = 2
ENVIRONMENT = 3
LOCKED = 4
PREEMPTED = 75

MEANINGS = {
    OK: "done",
    FAILED: "the run failed",
    USAGE: "usage, config or input error (the message names the fix)",
    ENVIRONMENT: "environment error (disk, permissions, ffmpeg): fix it and rerun",
    LOCKED: "another run holds the dataset folder (--wait-lock waits)",
    PREEMPTED: "preempted after saving a checkpoint: rerun to resume",
}

EPILOG = ("exit codes: 0 done; 1 run failed; 2 usage, config or input error (the message names "
          "the fix); 3 environment error; 4 dataset folder locked by another run; 75 preempted, "
          "rerun to resume")

__all__ = ["ENVIRONMENT", "EPILOG", "FAILED", "LOCKED", "MEANINGS", "OK", "PREEMPTED", "USAGE",
           "UsageError", "usage_error"]


class UsageError(Exception):
    """A mistake the user can fix (a wrong argument, a missing file or folder): exits ``USAGE`` with
    the message, which names what is wrong and, after ``hint``, the fix."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(f"{message} ({hint})" if hint else message)
        self.hint = hint


def usage_error(error: BaseException | str, file: TextIO | None = None) -> int:
    """Print ``error: <message>`` on stderr and return ``USAGE`` (for ``return usage_error(e)`` in a
    CLI)."""
    print(f"error: {error}", file=file or sys.stderr)
    return USAGE
