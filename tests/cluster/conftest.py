"""The session's one-host Slurm cluster (started once, stopped by pid at the end); skips with the
reason if impossible."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.slurm import Cluster, why_not


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = why_not()
    if reason:
        pytest.skip(reason)
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
