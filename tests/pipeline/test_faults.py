"""Fault injection: SIGKILL each pipeline stage at its named crash points, rerun, compare with an
uninterrupted run.

An uninterrupted run traced with ``TSTL_FAULT_TRACE`` lists every (point, hit) it passes: each final
rename (videos, CSVs, listings, manifest), each journal append, the manifest compaction. For every
stage, at least 20 distinct (point, hit) pairs (finalize has fewer points, so it also gets a second
kill during the rerun) are each run with ``TSTL_FAULT_AT`` killing the stage there, then rerun to
completion without flags. The outputs must equal the uninterrupted run byte for byte (the manifest
row by row, without its timestamps), with no partial file under a final name and no temp file or
journal left. The figures are in docs/pipeline.md.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from pipeline import manifest as mf
from pipeline.cli import main as cli_main
from pipeline.synthetic import SynthConfig, generate

ROOT = Path(__file__).resolve().parents[2]
CFG = SynthConfig(seed=3, num_classes=2, videos_per_class=4, ucf_groups_per_class=3,
                  ucf_clips_per_group=1, broken_ssv2=1, broken_ucf=1, duration_s=(0.5, 0.7),
                  ssv2_widths=(160, 176))
FAST = ["--jobs", "1", "--height", "48", "--preset", "ultrafast", "--max-failure-fraction", "0.5"]
VOLATILE = {"processed_at", "output_mtime_ns"}  # differ between any two runs, killed or not
MIN_TRIALS = 20


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("raw")
    generate(CFG, out, jobs=2)
    return out


def _run(args: list[str], kill_at: str | None = None, trace: Path | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TSTL_FAULT")}
    env["PYTHONPATH"] = str(ROOT)
    if kill_at:
        env["TSTL_FAULT_AT"] = kill_at
    if trace:
        env["TSTL_FAULT_TRACE"] = str(trace)
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if kill_at is None and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc.returncode


def _snapshot(dataset_dir: Path) -> dict[str, object]:
    """Every file under the dataset folder: bytes, or the manifest's rows without volatile
    columns."""
    out: dict[str, object] = {}
    for p in sorted(dataset_dir.rglob("*")):
        # the lock records pid and time by design
        if not p.is_file() or p.name.startswith(".tstl.lock"):
            continue
        rel = str(p.relative_to(dataset_dir))
        if p.name.endswith(".parquet"):
            out[rel] = [{k: v for k, v in row.items() if k not in VOLATILE}
                        for row in mf.read_rows(p)]
        else:
            out[rel] = p.read_bytes()
    return out


def _leftovers(dataset_dir: Path) -> list[str]:
    return [str(p) for p in dataset_dir.rglob("*") if re.search(r"\.tmp-|\.journal$", p.name)]


def _pairs(trace: Path) -> list[tuple[str, int]]:
    """Every (point, k-th hit) the traced run passed, in order."""
    seen: Counter[str] = Counter()
    pairs = []
    for name in trace.read_text().split():
        seen[name] += 1
        pairs.append((name, seen[name]))
    return pairs


def _spread(pairs: list[tuple[str, int]], n: int) -> list[tuple[str, int]]:
    """All pairs if there are at most ``n``; else every point's first and last hit plus evenly
    spread others."""
    if len(pairs) <= n:
        return pairs
    chosen = {p for p in pairs if p[1] == 1}
    last = {}
    for name, k in pairs:
        last[name] = k
    chosen |= set(last.items())
    rest = [p for p in pairs if p not in chosen]
    step = max(1, len(rest) // max(1, n - len(chosen)))
    chosen |= set(rest[::step][: max(0, n - len(chosen))])
    return [p for p in pairs if p in chosen]


def _check(trials: list[tuple[str, ...]], make: callable, args_of: callable, reference: dict,
           dataset: str) -> None:
    differences, partial, temps = [], [], []
    for kills in trials:
        data = make()
        for at in kills:
            rc = _run(args_of(data), kill_at=at)
            assert rc == -9, f"{dataset}: kill at {at} did not happen (exit {rc})"
        # the rerun, in this process: saves an interpreter start per trial
        assert cli_main(args_of(data)) == 0
        got = _snapshot(data / dataset)
        if got != reference:
            diff = sorted(k for k in set(got) | set(reference) if got.get(k) != reference.get(k))
            differences.append((kills, diff))
            partial += [k for k in diff if k.endswith(".mp4") and k in got]
        temps += _leftovers(data / dataset)
        shutil.rmtree(data)
    print(f"{dataset}: {len(trials)} kill trials, {len(differences)} differing, {len(partial)} "
          f"partial files, {len(temps)} temp files left")
    assert not differences and not partial and not temps, (differences, partial, temps)


@pytest.mark.parametrize("dataset", ["ssv2", "ucf101"])
def test_prepare_killed_at_every_point_reruns_to_identical_outputs(
        raw: Path, tmp_path: Path, dataset: str) -> None:
    flag = "--ssv2-root" if dataset == "ssv2" else "--ucf101-root"

    def args_of(data: Path) -> list[str]:
        return [f"prepare-{dataset}", flag, str(raw / dataset), "--data-dir", str(data), *FAST]

    trace = tmp_path / "trace"
    _run(args_of(tmp_path / "ref"), trace=trace)
    reference = _snapshot(tmp_path / "ref" / dataset)
    assert not _leftovers(tmp_path / "ref" / dataset)
    pairs = _pairs(trace)
    names = {name for name, _ in pairs}
    assert {"journal-append", "rename:video", "rename:manifest.parquet", "compact:drop-journal",
            "rename:classes.txt", "rename:excluded.txt"} <= names
    chosen = _spread(pairs, MIN_TRIALS)
    assert len(chosen) >= MIN_TRIALS
    counter = iter(range(10**6))
    _check([(f"{name}#{k}",) for name, k in chosen], lambda: tmp_path / f"run{next(counter)}",
           args_of, reference, dataset)


def test_finalize_killed_at_every_point_and_again_in_the_rerun(raw: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    for i in (1, 2):
        _run(["prepare-ssv2", "--ssv2-root", str(raw / "ssv2"), "--data-dir", str(base), "--part",
              f"{i}/2", *FAST])
    assert not (base / "ssv2/annotations/train.csv").exists()

    def args_of(data: Path) -> list[str]:
        return ["finalize", str(data / "ssv2")]

    counter = iter(range(10**6))

    def make() -> Path:
        data = tmp_path / f"run{next(counter)}"
        shutil.copytree(base, data)
        return data

    ref = make()
    trace = tmp_path / "trace"
    _run(args_of(ref), trace=trace)
    reference = _snapshot(ref / "ssv2")
    pairs = [f"{name}#{k}" for name, k in _pairs(trace)]
    assert {"rename:manifest.parquet#1", "rename:train.csv#1",
            "rename:excluded.txt#1"} <= set(pairs)
    # Few points in one finalize: kill at each, and at each again during the first rerun.
    trials = [(p,) for p in pairs] + [(p, q) for p in pairs for q in pairs]
    assert len(trials) >= MIN_TRIALS
    _check(trials, make, args_of, reference, "ssv2")
