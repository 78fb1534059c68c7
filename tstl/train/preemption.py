"""Preemption-safe runs: a signal asks the run to stop with a resumable state at a safe point.

* ``SIGTERM`` (what Slurm, Kubernetes and ``kill`` send before the hard kill) and ``SIGUSR1``
  (Slurm's warning signal, ``#SBATCH --signal=B:USR1@120`` or ``scancel --signal=USR1 --batch``,
  forwarded by ``configs/launch/slurm_train.sbatch``) only set a flag. The handlers are installed
  for a whole command (``handle_signals``: from before the process group is joined to the exit),
  so a signal during start-up, a save, an evaluation or the report never kills the process
  (issue 21).
* The trainer asks ``poll()`` at its safe points (docs/training.md, "Preemption"): after every
  optimizer step, at an epoch's end, before the first step and between test batches. The flag is
  all-reduced (``dist.all_max``), so a signal that reached one rank stops every rank at the same
  point, each having saved its part of the checkpoint.

After the save the trainer raises ``Preempted``; the CLI exits with ``EXIT_PREEMPTED`` (see
docs/training.md). A rerun (or a Slurm requeue of the same job) resumes from that checkpoint at the
step after it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator
from types import FrameType

import torch

from tstl.core import exitcodes
from tstl.train import dist

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PREEMPTED = exitcodes.PREEMPTED  # 75
"""Exit code after a save on a signal: EX_TEMPFAIL ("try again"), non-zero so that a job script or
scheduler never mistakes a preempted run for a finished one, and distinct from a crash (1) or a
config error (2)."""


class Preempted(Exception):
    """Raised after the checkpoint that a signal asked for was saved; the run can be resumed."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} received: checkpoint saved at step "
                         f"{step}; rerun (or requeue) to resume")
        self.signum, self.step = signum, step


class PreemptionWatch:
    """The signal flag: ``install()`` sets the handlers, ``poll()`` (collective) tells all ranks."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionWatch:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # only a flag: the handler runs between bytecodes, possibly inside a collective or a save
        if self.signum is None:
            logger.warning("%s received: stopping at the next safe point with a resumable "
                           "checkpoint", signal.Signals(signum).name)
        self.signum = signum

    def poll(self, device: torch.device, *flags: bool) -> tuple[bool, ...]:
        """Collective: (stop, *flags), each true on every rank if it is true on any rank, in one
        all-reduce.

        ``flags`` ride along so that a caller's own decisions (the checkpointer's wall clock on rank
        0) cost no second collective.
        """
        got = dist.all_max([float(self.signum is not None), *map(float, flags)], device)
        stop = bool(got[0])
        if stop and self.signum is None:  # another rank got the signal
            self.signum = int(signal.SIGTERM)
        return (stop, *map(bool, got[1:]))


_ACTIVE: PreemptionWatch | None = None


def active() -> PreemptionWatch | None:
    """The watch that ``handle_signals`` installed for the running command, if any."""
    return _ACTIVE


@contextlib.contextmanager
def handle_signals() -> Iterator[PreemptionWatch]:
    """Catch SIGTERM/SIGUSR1 for a whole command: every ``Trainer`` of it polls this watch (TSTL
    runs several).

    On the way out the previous handlers come back, unless a signal came: then the process is about
    to exit 75 and ignores these signals from here on, so that a second one (``srun
    --kill-on-bad-exit`` terminating the ranks that have not exited yet, once the first rank has
    exited 75) cannot turn that exit into a kill (143) and the job into a failure. Ignored at the
    OS level, not by a Python handler: CPython puts the default action back on every signal with a
    Python handler while the interpreter finalizes, the moment a rank spends tearing down its
    process group.
    """
    global _ACTIVE
    watch = PreemptionWatch().install()
    _ACTIVE = watch
    try:
        yield watch
    finally:
        _ACTIVE = None
        if watch.signum is None:
            watch.uninstall()
        else:
            for sig in SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
