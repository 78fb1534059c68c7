"""One metrics sink: every scalar goes to ``metrics.jsonl`` and TensorBoard, on rank 0 only."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tstl.train import dist


class MetricsSink:
    def __init__(self, run_dir: Path) -> None:
        self.enabled = dist.is_main()
        self._writer = None
        self._jsonl = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            run_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(run_dir / "tensorboard"))
            # the handle lives as long as the sink (closed in close()), so no with block
            self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115

    def log(self, step: int, scalars: dict[str, float], **context) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **context, **scalars})
                          + "\n")
        for k, v in scalars.items():
            self._writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self._writer.close()
            self._jsonl.close()
