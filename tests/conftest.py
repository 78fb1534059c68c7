"""Fixtures shared by the training and TSTL tests."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from pipeline.prepare import PrepareOptions, prepare_ssv2
from pipeline.synthetic import SynthConfig, generate
from shard_tools.build import BuildOptions, build_dataset
from tstl.core import torchvision_shim

# Test modules import timm (hence torchvision) directly; on a CPU torch the shim must come first (see its docstring).
torchvision_shim.install()

ROOT = Path(__file__).resolve().parents[1]
# A tiny B-CAST on tiny clips: every training test runs in seconds on 2 CPU cores.
TINY = ["model.name=bcast_test", "data.num_frames=4", "data.input_size=32", "data.batch_size=2",
        "data.eval_batch_size=4", "data.num_workers=0", "data.test_views=[2,2]", "log_every=1", "val_every=1"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SSV2-format synthetic release, prepared and sharded: 4 classes, 12 training and 4 validation videos."""
    root = tmp_path_factory.mktemp("train-data")
    generate(SynthConfig(seed=2, num_classes=4, videos_per_class=5, broken_ssv2=0, duration_s=(1.0, 1.5)),
             root / "raw", datasets=("ssv2",), jobs=2)
    prepare_ssv2(root / "raw/ssv2", PrepareOptions(data_dir=root, jobs=2))
    build_dataset(root, "ssv2", 1, BuildOptions(max_samples=2, jobs=2))
    return root


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def subprocess_env() -> dict:
    """One thread per process (two ranks share 2 cores) and no inherited rendezvous port."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MASTER_PORT", None)
    return env


@pytest.fixture
def serve():
    """Factory of loopback http servers that count the bytes they send (``benchmarks.http_counting``):
    ``with serve(folder, ranges=True) as srv: ... srv.url``."""
    from benchmarks.http_counting import CountingServer

    return CountingServer
