"""Named crash points for fault-injection tests: a stage calls ``fault_point("name")`` where a kill
matters.

Two environment variables drive it; without them ``fault_point`` costs one dict lookup and does
nothing:

* ``TSTL_FAULT_TRACE=<file>``: append every point this process reaches to ``<file>`` (``name`` per
  line), so a test can list the points an uninterrupted run passes through;
* ``TSTL_FAULT_AT=<name>[#<k>]``: SIGKILL this process the ``k``-th time (default the first) it
  reaches ``name``, exactly as a power cut or the OOM killer would (no cleanup, no ``finally``).

Written here rather than taken from a library because the hook must be a plain function call in
production code paths with no dependency and no cost when unset.
"""

from __future__ import annotations

import os
import signal

_TRACE_ENV = "TSTL_FAULT_TRACE"
_AT_ENV = "TSTL_FAULT_AT"
_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Mark a point where a crash must leave the outputs consistent (see the module docstring)."""
    trace, at = os.environ.get(_TRACE_ENV), os.environ.get(_AT_ENV)
    if not trace and not at:
        return
    _hits[name] = count = _hits.get(name, 0) + 1
    if trace:
        with open(trace, "a") as f:
            f.write(f"{name}\n")
    if at:
        target, _, k = at.partition("#")
        if target == name and count == int(k or 1):
            os.kill(os.getpid(), signal.SIGKILL)
