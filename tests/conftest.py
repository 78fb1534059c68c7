"""Fixtures shared by the training and TSTL tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.prepare import PrepareOptions, prepare_ssv2
from pipeline.synthetic import SynthConfig, generate
from shard_tools.build import BuildOptions, build_dataset
from tstl.core import torchvision_shim

# Test modules import timm (hence torchvision) directly; on a CPU torch the shim must come first
# (see its docstring).
torchvision_shim.install()

ROOT = Path(__file__).resolve().parents[1]
# A tiny B-CAST on tiny clips: every training test runs in seconds on 2 CPU cores.
TINY = ["model.name=bcast_test", "data.num_frames=4", "data.input_size=32", "data.batch_size=2",
        "data.eval_batch_size=4", "data.num_workers=0", "data.test_views=[2,2]", "log_every=1",
        "val_every=1"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SSV2-format synthetic release, prepared and sharded: 4 classes, 12 training and 4 validation
    videos."""
    root = tmp_path_factory.mktemp("train-data")
    generate(SynthConfig(seed=2, num_classes=4, videos_per_class=5, broken_ssv2=0,
                         duration_s=(1.0, 1.5)),
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
    """Factory of loopback http servers that count the bytes they send
    (``benchmarks.http_counting``): ``with serve(folder, ranges=True) as srv: ... srv.url``."""
    from benchmarks.http_counting import CountingServer

    return CountingServer


class Leaks:
    """What a test's processes leave behind (issue 21): a process, a ``/dev/shm`` file, a temp file.

    Every process started with ``env()`` (and every process those start: launcher, ranks, loader
    workers, ``pipe:`` commands) carries the test's tag in its environment and writes its temp files
    into the test's own temp folder; ``port()`` hands out the rendezvous ports, which DeepSpeed's
    shared-memory files are named after. Other helpers' and agents' processes on the same machine
    are told apart by the tag, never by name.
    """

    SHM = Path("/dev/shm")

    def __init__(self, folder: Path) -> None:
        self.tag = f"{os.getpid()}-{uuid.uuid4().hex}"
        self.tmp = folder / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.ports: list[str] = []
        self.shm_before = set(os.listdir(self.SHM)) if self.SHM.is_dir() else set()

    def env(self, **extra: str) -> dict:
        return {**subprocess_env(), TAG_ENV: self.tag, "TMPDIR": str(self.tmp),
                "TORCH_EXTENSIONS_DIR": str(self.tmp.parent / "torch_extensions"), **extra}

    def port(self) -> str:
        self.ports.append(free_port())
        return self.ports[-1]

    def processes(self) -> dict[int, str]:
        """{pid: command line} of every live process carrying the tag (a zombie is dead: its
        parent reaps it)."""
        found = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                environ = (proc / "environ").read_bytes().split(b"\0")
                if f"{TAG_ENV}={self.tag}".encode() not in environ:
                    continue
                if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
                found[int(proc.name)] = cmdline.decode(errors="replace")[:300]
            except OSError:  # gone meanwhile
                continue
        return found

    def shm_files(self) -> list[str]:
        """/dev/shm entries created since the start that carry one of our ports in their name
        (DeepSpeed names its all-reduce buffers
        ``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``)."""
        new = sorted(set(os.listdir(self.SHM)) - self.shm_before) if self.SHM.is_dir() else []
        return [n for n in new if any(f"_{p}_" in n for p in self.ports)]

    def check(self, grace_s: float = 30.0) -> None:
        """Assert that nothing is left (processes still exiting get ``grace_s`` to go); what is left
        is removed first (our processes by pid, our files), so that a failing test leaves nothing on
        the machine either."""
        deadline = time.monotonic() + grace_s
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        procs, shm = self.processes(), self.shm_files()
        temps = sorted(str(p.relative_to(self.tmp)) for p in self.tmp.rglob("*")
                       if not p.relative_to(self.tmp).parts[0].startswith(CACHES))
        for pid in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for name in shm:
            (self.SHM / name).unlink(missing_ok=True)
        assert not procs, f"processes left behind: {procs}"
        assert not shm, f"/dev/shm files left behind: {shm}"
        assert not temps, f"temp files left behind in {self.tmp}: {temps}"


TAG_ENV = "TSTL_TEST_TAG"
CACHES = ("torchinductor_",)
"""Temp-folder entries that are caches meant to stay, one per user (torch's compile cache, created
by importing DeepSpeed), not files a run leaves behind."""


@pytest.fixture
def leaks(tmp_path: Path) -> Iterator[Leaks]:
    """A ``Leaks`` for the test, checked (and cleaned) at its end."""
    found = Leaks(tmp_path)
    yield found
    found.check()
