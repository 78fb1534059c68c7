"""Fault injection for ``shard_tools build`` (issue 12, item 6): SIGKILL the build at every named
crash point (``tstl.core.faults``), rerun it, and compare every output byte for byte with an
uninterrupted run.

Two scenarios: a first build, and a rebuild after the annotations changed (one training label, so
one training shard is rebuilt, one is reused, and the validation set is already current). Between
the kill and the rerun a reader must see a complete set, the old or the new one, never a mix.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from shard_tools.cli import main as cli_main
from shard_tools.verify import verify
from tstl.core import shards
from tstl.core.ffmpeg import ffmpeg_exe

ROOT = Path(__file__).resolve().parents[2]
SPLITS = ("train", "val")
TEMP_MARKERS = (".tmp-", ".link-")


def _mp4(path: Path, frames: int, hue: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=32x24:rate=12",
                    "-vf", f"hue=h={hue}", "-frames:v", str(frames), "-c:v", "libx264", "-pix_fmt",
                    "yuv420p", "-threads", "1", "-fflags", "+bitexact", "-y", str(path)],
                   check=True)


def _cmd(data: Path) -> list[str]:
    return ["build", "--dataset", "ssv2", "--data-dir", str(data), "--max-samples", "2", "--jobs",
            "1"]


def _run(data: Path, **env: str) -> int:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    proc = subprocess.run([sys.executable, "-m", "shard_tools.cli", *_cmd(data)], cwd=ROOT,
                          env=full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          check=False)
    return proc.returncode


def _tree(d: Path) -> dict[str, tuple[str, bytes | str]]:
    """Everything under ``d``: symlinks by target, files by content."""
    out: dict[str, tuple[str, bytes | str]] = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_file():
            out[rel] = ("file", p.read_bytes())
    return out


def _visible(out: Path) -> dict[str, bytes] | None:
    """The files a reader of ``out`` sees (None: no set there)."""
    if not out.exists():
        return None
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _copy(src: Path, dst: Path) -> Path:
    # copy2 keeps the videos' mtimes, which the shard plans hash
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture(scope="module")
def states(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``fresh`` (prepared, no shards), ``built`` (its reference build), ``changed`` (built + a
    changed training label) and ``rebuilt`` (the reference rebuild of ``changed``), each with the
    trace of its uninterrupted run."""
    base = tmp_path_factory.mktemp("faults")
    fresh = base / "fresh"
    ann = fresh / "ssv2/annotations"
    for i in range(6):
        _mp4(fresh / "ssv2/videos" / f"{i + 1}.mp4", 6 + i, 30 * i)
    ann.mkdir(parents=True)
    (ann / "train.csv").write_text("".join(f"{i + 1}.mp4 {i % 3}\n" for i in range(4)))
    (ann / "val.csv").write_text("5.mp4 1\n6.mp4 2\n")
    (ann / "classes.txt").write_text("a\nb\nc\n")
    built = _copy(fresh, base / "built")
    assert _run(built, TSTL_FAULT_TRACE=str(base / "built.trace")) == 0
    changed = _copy(built, base / "changed")
    # 4.mp4: 0 -> 2
    (changed / "ssv2/annotations/train.csv").write_text("1.mp4 0\n2.mp4 1\n3.mp4 2\n4.mp4 2\n")
    rebuilt = _copy(changed, base / "rebuilt")
    assert _run(rebuilt, TSTL_FAULT_TRACE=str(base / "rebuilt.trace")) == 0
    return {"fresh": fresh, "built": built, "changed": changed, "rebuilt": rebuilt, "base": base}


def _pairs(trace: Path) -> list[tuple[str, int]]:
    counts: Counter[str] = Counter()
    pairs = []
    for name in trace.read_text().split():
        counts[name] += 1
        pairs.append((name, counts[name]))
    return pairs


def test_reference_runs(states: dict[str, Path]) -> None:
    built, rebuilt = states["built"] / "ssv2/shards", states["rebuilt"] / "ssv2/shards"
    for split in SPLITS:
        assert ((built / split).is_symlink()
                and all(not r.errors for r in verify(built / split, decode=False)))
        assert all(not r.errors for r in verify(rebuilt / split, decode=False))
    assert _visible(built / "val") == _visible(rebuilt / "val")
    assert _visible(built / "train") != _visible(rebuilt / "train")
    # one training shard is reused (a hard link: its mtime is the first build's), one rebuilt
    old, new = shards.load(built / "train"), shards.load(rebuilt / "train")
    same = [a.name for a, b in zip(old.shards, new.shards) if a.sha256 == b.sha256]
    assert len(same) == 1
    assert (states["changed"] / "ssv2/shards/train" / same[0]).stat().st_mtime_ns == \
        (rebuilt / "train" / same[0]).stat().st_mtime_ns
    # a rerun with nothing changed touches nothing, and a rebuild from scratch is byte-identical
    again = _copy(states["rebuilt"], states["base"] / "again")
    mtimes = {p: p.lstat().st_mtime_ns for p in (again / "ssv2/shards").rglob("*")}
    assert cli_main(_cmd(again)) == 0
    assert {p: p.lstat().st_mtime_ns for p in (again / "ssv2/shards").rglob("*")} == mtimes
    scratch = _copy(states["changed"], states["base"] / "scratch")
    shutil.rmtree(scratch / "ssv2/shards")
    assert cli_main(_cmd(scratch)) == 0
    assert _tree(scratch / "ssv2/shards") == _tree(rebuilt)


def test_kill_at_every_point_then_rerun_gives_the_uninterrupted_result(
        states: dict[str, Path]) -> None:
    base = states["base"]
    scenarios = [("fresh", "built"), ("changed", "rebuilt")]
    trials = []
    for start, ref in scenarios:
        pairs = _pairs(base / f"{ref}.trace")
        assert len(set(pairs)) == len(pairs)
        trials += [(start, ref, name, hit) for name, hit in pairs]
    names = {name for _, _, name, _ in trials}
    assert {"shards.tar.tmp", "shards.tar", "shards.reuse", "shards.manifest.tmp",
            "shards.index.tmp", "shards.generation", "shards.link.tmp", "shards.switch",
            "shards.gc"} <= names
    assert len(trials) >= 20
    stats = Counter()
    for n, (start, ref, name, hit) in enumerate(trials):
        work = _copy(states[start], base / f"trial-{n}")
        old = {s: _visible(states[start] / "ssv2/shards" / s) for s in SPLITS}
        new = {s: _visible(states[ref] / "ssv2/shards" / s) for s in SPLITS}
        rc = _run(work, TSTL_FAULT_AT=f"{name}#{hit}")
        assert rc == -9, f"{name}#{hit}: the build was not killed (rc {rc})"
        for s in SPLITS:  # a reader between the kill and the rerun
            seen = _visible(work / "ssv2/shards" / s)
            assert seen in (old[s], new[s]), f"{name}#{hit}: {s} is neither the old nor the new set"
            stats["complete"] += seen is not None
        assert cli_main(_cmd(work)) == 0
        got, want = _tree(work / "ssv2/shards"), _tree(states[ref] / "ssv2/shards")
        assert sorted(got) == sorted(want), f"{name}#{hit}: files differ after the rerun"
        diffs = [k for k in want if got[k] != want[k]]
        assert not diffs, f"{name}#{hit}: {diffs} differ from the uninterrupted run"
        assert not [k for k in got if any(m in k for m in TEMP_MARKERS)], (
            f"{name}#{hit}: temp files left")
        stats["trials"] += 1
        shutil.rmtree(work)
    print(f"fault injection: {stats['trials']} kills at {len(names)} points, 0 differences, 0 "
          f"partial files, 0 temp files; {stats['complete']} complete sets seen "
          "between kill and rerun")


def test_plain_folder_sets_move_to_the_symlink_layout(states: dict[str, Path]) -> None:
    """A set built before the symlink layout is reused (hard links) and moved once, also across a
    kill."""
    for n, kill in enumerate(("", "shards.legacy#1")):
        work = _copy(states["built"], states["base"] / f"legacy-{n}")
        for s in SPLITS:  # make both splits plain folders, as older builds wrote them
            out = work / "ssv2/shards" / s
            gen = out.resolve()
            out.unlink()
            os.replace(gen, out)
        mtime = (work / "ssv2/shards/val/shard-000000.tar").stat().st_mtime_ns
        if kill:
            assert _run(work, TSTL_FAULT_AT=kill) == -9
            # between the two renames: absent, never mixed
            assert not (work / "ssv2/shards/train").exists()
        assert cli_main(_cmd(work)) == 0
        assert _tree(work / "ssv2/shards") == _tree(states["built"] / "ssv2/shards")
        assert (work / "ssv2/shards/val/shard-000000.tar").stat().st_mtime_ns == mtime
