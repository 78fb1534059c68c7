"""The run's log file and the one line a failed command ends with (issue 21).

Every rank of ``tstl train``/``eval``/``train-tstl``/``eval-tstl`` copies its log records into
``<run folder>/logs/<command>-rank<r>.log`` (appended: a resumed run adds to it). A failure ends, on
every rank, with one line on stderr, ``error: <cause> (<fix>)``, and the exit code of
``tstl.core.exitcodes``; the traceback goes to the log file only, and to the terminal as well with
``--debug``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from tstl.core import exitcodes

logger = logging.getLogger(__name__)

_FILE_ONLY = "file_only"
_handlers: list[logging.FileHandler] = []


def rank() -> int:
    """This process's rank as the launcher set it (there may be no process group yet, or no
    longer)."""
    return int(os.environ.get("RANK", "0"))


def attach(folder: Path, command: str) -> Path:
    """Copy every record this process logs into ``<folder>/logs/<command>-rank<r>.log``; returns its
    path.

    Call it once the run folder is known (after the config loaded). The terminal's handlers stop
    showing the records meant for the file only (``fail``'s traceback).
    """
    path = Path(folder) / "logs" / f"{command}-rank{rank()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in root.handlers:
        if not any(isinstance(f, _TerminalFilter) for f in h.filters):
            h.addFilter(_TerminalFilter())
    root.addHandler(handler)
    _handlers.append(handler)
    return path


def log_file() -> Path | None:
    return Path(_handlers[-1].baseFilename) if _handlers else None


def detach() -> None:
    """Close the log files (tests run commands in-process one after another)."""
    root = logging.getLogger()
    for h in _handlers:
        root.removeHandler(h)
        h.close()
    _handlers.clear()


class _TerminalFilter(logging.Filter):
    """Keeps records marked file-only off the terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, _FILE_ONLY, False)


def fail(error: BaseException, *, debug: bool = False) -> int:
    """Report a failed command: traceback to the log file (and the terminal with ``debug``), one
    ``error:`` line on stderr; returns the exit code."""
    code, cause, fix = explain(error)
    where = log_file()
    if where is None or debug:
        fix += "" if debug else "; rerun with --debug to print the traceback"
    else:
        fix += f"; the traceback is in {where}"
    line = f"{cause} ({fix})"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        line = f"rank {rank()}: {line}"
    logger.error("%s", line, exc_info=error, extra={_FILE_ONLY: not debug})
    print(f"error: {line}", file=sys.stderr, flush=True)
    return code


RESUME = "then rerun: it resumes from the last complete checkpoint"
FIXES = {  # what to do about a kind of failure (the cause is the error's own message)
    "disk": "free space on that disk (or raise the quota), " + RESUME,
    "permission": "make the folder writable (or choose another out_dir), " + RESUME,
    "source": ("a shard source stalled or failed: check that data_dir (or data.shard_url_template) "
               "is reachable, or raise data.read_timeout_s / data.read_retries; " + RESUME),
    "memory": ("lower data.batch_size (raise engine.accum_steps to keep the total batch) or set "
               "model.grad_checkpointing=true, " + RESUME),
    "peer": "another rank stopped first: its log names the cause",
    "run": "see the message; " + RESUME,
    "unknown": "not a failure we know: report it with the traceback; " + RESUME,
}


def explain(error: BaseException) -> tuple[int, str, str]:
    """(exit code, cause, fix) of a failure: the cause is the error's own last line, the fix by its
    kind (of the error or of one it was raised from)."""
    cause = _last_line(error)
    for e in _chain(error):
        found = _known(e)
        if found is not None:
            return found[0], cause, found[1]
    return exitcodes.FAILED, cause, FIXES["unknown"]


def _known(e: BaseException) -> tuple[int, str] | None:
    import errno

    from tstl.train.checkpoint import CheckpointError

    name = type(e).__name__
    if isinstance(e, CheckpointError):
        return exitcodes.USAGE, e.hint or "see the message"
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return exitcodes.ENVIRONMENT, FIXES["disk"]
    if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return exitcodes.ENVIRONMENT, FIXES["permission"]
    if isinstance(e, TimeoutError | ConnectionError) or name in ("URLError", "IncompleteRead"):
        return exitcodes.FAILED, FIXES["source"]
    if name == "OutOfMemoryError":
        return exitcodes.FAILED, FIXES["memory"]
    if _peer_gone(e):
        return exitcodes.FAILED, FIXES["peer"]
    if name in ("NonFiniteLossError", "BadSampleRateError"):
        return exitcodes.FAILED, FIXES["run"]
    return None


def _peer_gone(e: BaseException) -> bool:
    """A collective that failed because a peer process is gone (gloo/NCCL say it in words only)."""
    text = str(e)
    words = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
             "NCCL communicator was aborted")
    return type(e).__name__ == "DistBackendError" or any(w in text for w in words)


def _chain(error: BaseException) -> list[BaseException]:
    """The error and those it was raised from (``from e``, or while handling another)."""
    seen: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def _last_line(error: BaseException) -> str:
    """``<Type>: <message>`` on one line; a DataLoader worker's error carries the original traceback
    in its message, whose last line is the worker's own ``<Type>: <message>``."""
    text = str(error)
    hint = getattr(error, "hint", "")
    if hint and text.endswith(f" ({hint})"):  # CheckpointError, UsageError: the fix comes apart
        text = text[:-len(hint) - 3]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    last = lines[-1] if "Traceback" in text else " ".join(lines)
    name = type(error).__name__
    return last if last.startswith(f"{name}:") else f"{name}: {last}"
