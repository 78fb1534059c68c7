"""Preemption-safe training: a signal or the wall clock asks for a checkpoint at the next step boundary.

* ``SIGTERM`` (what Slurm, Kubernetes and ``kill`` send before the hard kill) and ``SIGUSR1`` (Slurm's warning signal,
  ``#SBATCH --signal=B:USR1@120`` or ``scancel --signal=USR1 --batch``, forwarded by
  ``configs/launch/slurm_train.sbatch``) only set a flag; the trainer polls it after every optimizer step. The flag
  is all-reduced (``dist.all_max``), so a signal that reached one rank stops every rank at the same step, each having
  saved its part of the checkpoint.
* ``checkpoint.every_minutes``: rank 0's wall clock decides and the decision is broadcast, so all ranks save together
  even when their clocks or speeds differ.

After the save the trainer raises ``Preempted``; the CLI exits with ``EXIT_PREEMPTED`` (see docs/training.md). A rerun
(or a Slurm requeue of the same job) resumes from that checkpoint at the step after it.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import torch

from tstl.core import exitcodes
from tstl.train import dist

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PREEMPTED = exitcodes.PREEMPTED  # 75
"""Exit code after a save on a signal: EX_TEMPFAIL ("try again"), non-zero so that a job script or scheduler never
mistakes a preempted run for a finished one, and distinct from a crash (1) or a config error (2)."""


class Preempted(Exception):
    """Raised after the checkpoint that a signal asked for was saved; the run can be resumed."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} received: checkpoint saved at step {step}; rerun (or "
                         "requeue) to resume")
        self.signum, self.step = signum, step


class PreemptionWatch:
    """Installs the signal handlers and keeps the wall-clock timer; ``poll()`` is collective."""

    def __init__(self, every_minutes: float, device: torch.device) -> None:
        self.every_s = every_minutes * 60.0
        self.device = device
        self.signum: int | None = None
        self.last_save = time.monotonic()
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionWatch:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # only a flag: the handler runs between bytecodes, possibly inside a collective or a save
        if self.signum is None:
            logger.warning("%s received: saving a checkpoint at the next step boundary", signal.Signals(signum).name)
        self.signum = signum

    def saved(self) -> None:
        """A checkpoint was written (for any reason): the wall-clock timer restarts."""
        self.last_save = time.monotonic()

    def poll(self) -> tuple[bool, bool]:
        """Collective, once per optimizer step: (save now, then stop). Every rank gets the same answer.

        One all-reduce (MAX) of [signal on this rank, timer due on rank 0 (0 elsewhere)]: any rank's signal stops
        everybody; only rank 0's clock decides a timed save.
        """
        due = dist.is_main() and self.every_s > 0 and time.monotonic() - self.last_save >= self.every_s
        flags = dist.all_max([float(self.signum is not None), float(due)], self.device)
        if flags[0]:
            if self.signum is None:  # another rank got the signal
                self.signum = int(signal.SIGTERM)
            return True, True
        return bool(flags[1]), False
