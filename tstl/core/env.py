"""Environment check run at the end of ``make setup``: every runtime dependency imports and ffmpeg
is usable."""

from __future__ import annotations

import importlib
import logging
import shutil

logger = logging.getLogger(__name__)


def check() -> None:
    """Import the stack (torch, timm, decord, webdataset, DeepSpeed, ...) and report versions; raise
    on failure."""
    from tstl.core.log import init_logging

    init_logging()
    from tstl.core import torchvision_shim

    torchvision_shim.install()
    versions = {}
    for name in ("torch", "torchvision", "timm", "decord", "webdataset", "av", "pyarrow", "einops",
                 "deepspeed"):
        mod = importlib.import_module(name)
        versions[name] = getattr(mod, "__version__", "?")
    from tstl.core.ffmpeg import ffmpeg_exe

    versions["ffmpeg"] = ffmpeg_exe()
    if shutil.which("g++") is None:
        logger.warning("no g++ on PATH: DeepSpeed's CPU backend JIT-compiles a small op and "
                       "needs one")
    logger.info("environment OK: %s", ", ".join(f"{k} {v}" for k, v in versions.items()))


if __name__ == "__main__":
    check()
