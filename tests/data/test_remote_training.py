"""Issue 13 item 6: train and evaluate with nothing local but the config; the shard sets come over
http (a ``python -m http.server`` on 127.0.0.1) or through ``pipe:`` commands, ``shards.json`` from
the same place."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, free_port, subprocess_env

CONFIGS = [str(ROOT / "configs/data/ssv2.yaml"), str(ROOT / "configs/demo.yaml")]


@contextlib.contextmanager
def http_server(directory: Path) -> Iterator[str]:
    """``python -m http.server`` on 127.0.0.1 serving ``directory``, stopped (by pid) at the end."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", port, "--bind", "127.0.0.1",
                             "--directory", str(directory)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("http.server did not come up") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _train(*overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tstl.train.cli", "train", "--config", *CONFIGS, "epochs=1", *TINY,
           *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600, check=False)


@pytest.mark.slow
def test_train_and_evaluate_from_an_http_data_dir(data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with http_server(data_dir) as url:
        proc = _train(f"data_dir={url}", f"out_dir={run}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        # the multi-view test ran too
        assert json.loads((run / "test/metrics.json").read_text())["videos"] == 4
        ev = subprocess.run([sys.executable, "-m", "tstl.train.cli", "eval", "--checkpoint",
                             str(run)], cwd=ROOT, env=subprocess_env(), capture_output=True,
                            text=True, timeout=600, check=False)
        assert ev.returncode == 0, ev.stderr[-3000:]
    assert f"data_dir: {url}" in (run / "config.yaml").read_text()
    assert json.loads(ev.stdout[ev.stdout.index("{"):])["videos"] == 4


@pytest.mark.slow
def test_train_and_evaluate_through_a_pipe_template(data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    template = f"pipe:cat {data_dir}/{{dataset}}/shards/{{split}}/{{name}}"
    proc = _train(f"data_dir={tmp_path / 'nothing'}", f"data.shard_url_template={template}",
                  f"out_dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "test/metrics.json").read_text())["videos"] == 4
    assert not (tmp_path / "nothing").exists()
