"""Bad ids, torn journals, stale temp files, environment errors, concurrent runs, absurd frame sizes
(issue 12)."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import manifest as mf
from pipeline.cli import main as cli_main
from pipeline.errors import EXIT_BAD_INPUT, EXIT_ENVIRONMENT, EXIT_LOCKED, EnvironmentFault
from pipeline.prepare import PrepareOptions, finalize, prepare_ssv2
from pipeline.runner import Item
from pipeline.synthetic import SynthConfig, generate
from pipeline.transcode import TranscodeParams, transcode
from tstl.core.ffmpeg import ffmpeg_exe

ROOT = Path(__file__).resolve().parents[2]
CFG = SynthConfig(seed=5, num_classes=2, videos_per_class=4, ucf_groups_per_class=3,
                  ucf_clips_per_group=1, broken_ssv2=1, broken_ucf=1, duration_s=(0.5, 0.7),
                  ssv2_widths=(160, 176))
FAST = ["--jobs", "1", "--height", "48", "--preset", "ultrafast", "--max-failure-fraction", "0.5"]
PARAMS = TranscodeParams(height=48, preset="ultrafast")


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("raw")
    generate(CFG, out, jobs=2)
    return out


@pytest.fixture(scope="module")
def reference(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("ref")
    assert _cli(["prepare-ssv2", "--ssv2-root", str(raw / "ssv2"), "--data-dir", str(data),
                 *FAST]).returncode == 0
    return data


def _cli(args: list[str], env: dict | None = None,
         kill_at: str | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("TSTL_FAULT")}
    full.update(PYTHONPATH=str(ROOT), **(env or {}))
    if kill_at:
        full["TSTL_FAULT_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=300)


def _outputs(dataset_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(dataset_dir)): p.read_bytes() for p in sorted(dataset_dir.rglob("*"))
            if p.is_file() and p.suffix in (".mp4", ".csv", ".txt")}


def _copy(reference: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(reference, data)
    return data


# ------------------------------------------------------------------------------- 1. video ids


@pytest.mark.parametrize("bad_id,reason", [
    ("../../../escape", "'.', '..' or empty path component"),
    ("12/34", "path separator"),
    ("12\n34", "control character"),
    ("", "empty id"),
    ("..", "'.', '..' or empty path component"),
    (" 12", "not an integer"),
    ("12abc", "not an integer"),
])
def test_unsafe_or_malformed_ssv2_ids_are_bad_metadata(
        raw: Path, tmp_path: Path, bad_id: str, reason: str, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "ssv2"
    shutil.copytree(raw / "ssv2/labels", src / "labels")
    train = json.loads((src / "labels/train.json").read_text())
    train[1]["id"] = bad_id
    (src / "labels/train.json").write_text(json.dumps(train))
    assert cli_main(["prepare-ssv2", "--ssv2-root", str(src), "--data-dir",
                     str(tmp_path / "d")]) == EXIT_BAD_INPUT
    log = capsys.readouterr().err
    assert f"{src / 'labels/train.json'}: entry 1 has id {bad_id!r}: {reason}" in log
    # nothing transcoded
    assert not (tmp_path / "d").exists() and not (tmp_path / "escape.mp4").exists()


@pytest.mark.parametrize("line,match", [
    ("SlideLeftToRight/../../../escape.avi 1", "'.', '..' or empty path component"),
    ("SlideLeftToRight/x/v_SlideLeftToRight_g01_c01.avi 1", "path separator"),
    ("SlideLeftToRight/v_SlideLeftToRight_g01_c01\x07.avi 1", "control character"),
    ("SlideLeftToRight/notes.avi 1", "not '<Class>/v_<Class>_gNN_cNN.avi'"),
    ("SlideLeftToRight/v_SlideLeftToRight_g01_c01.avi one", "label 'one' is not an integer"),
])
def test_bad_ucf101_list_lines_name_the_file_and_line(
        raw: Path, tmp_path: Path, line: str, match: str, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "ucf101"
    shutil.copytree(raw / "ucf101/ucfTrainTestlist", src / "ucfTrainTestlist")
    path = src / "ucfTrainTestlist/trainlist01.txt"
    lines = path.read_text().splitlines()
    lines[2] = line
    path.write_text("\r\n".join(lines) + "\r\n")
    assert cli_main(["prepare-ucf101", "--ucf101-root", str(src), "--data-dir",
                     str(tmp_path / "d")]) == 2
    log = capsys.readouterr().err
    assert f"{path}: line 3: " in log and match in log
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------------------- 2. stale temps


def test_rerun_and_finalize_remove_their_own_stale_temp_files_only(
        raw: Path, reference: Path, tmp_path: Path) -> None:
    data = _copy(reference, tmp_path)
    ds, ann = data / "ssv2", data / "ssv2/annotations"
    stale = [ann / ".train.csv.tmp-123", ann / ".classes.txt.tmp-9", ann / ".excluded.txt.tmp-4",
             ann / ".listed_val.csv.tmp-17", ds / ".manifest.parquet.tmp-77"]
    foreign = [ann / ".notes.md.tmp-1", ann / "train.csv.tmp-1", ds / ".other.parquet.tmp-3",
               data / ".x.csv.tmp-2"]
    for p in stale + foreign:
        p.write_text("left by a killed run")
    opts = PrepareOptions(data_dir=data, jobs=1, params=PARAMS)
    summary = prepare_ssv2(raw / "ssv2", opts)
    assert summary.done == 0  # a no-op rerun still clears them
    assert not any(p.exists() for p in stale) and all(p.exists() for p in foreign)
    for p in stale:
        p.write_text("left by a killed finalize")
    finalize(ds)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in foreign)
    assert _outputs(ds) == _outputs(reference / "ssv2")


def test_part_run_clears_only_its_own_manifest_temps(
        raw: Path, reference: Path, tmp_path: Path) -> None:
    data = _copy(reference, tmp_path)
    ds = data / "ssv2"
    own, other, shared = (ds / ".manifest.part-1-of-2.parquet.tmp-5",
                          ds / ".manifest.part-2-of-2.parquet.tmp-6",
                          ds / "annotations/.classes.txt.tmp-7")
    for p in (own, other, shared):
        p.write_text("x")
    prepare_ssv2(raw / "ssv2", PrepareOptions(data_dir=data, jobs=1, params=PARAMS, part=(1, 2)))
    # part 2 may be writing those right now
    assert not own.exists() and other.exists() and shared.exists()


# ------------------------------------------------------------------------------- 3. torn journal


@pytest.mark.parametrize("tear", ["partial-row", "row-without-newline"])
def test_torn_last_journal_line_costs_no_video(
        raw: Path, reference: Path, tmp_path: Path, tear: str) -> None:
    args = ["prepare-ssv2", "--ssv2-root", str(raw / "ssv2"), "--data-dir", str(tmp_path), *FAST]
    assert _cli(args, kill_at="journal-append#4").returncode == -signal.SIGKILL
    journal = mf.journal_path(tmp_path / "ssv2/manifest.parquet")
    text = journal.read_text()
    assert text.count("\n") == 3
    if tear == "partial-row":  # power cut in the middle of the 4th row
        journal.write_text(text + text.splitlines()[0][:37])
    else:  # full disk after the row but before its newline
        journal.write_text(text.rstrip("\n"))
    proc = _cli(args)
    assert proc.returncode == 0, proc.stderr
    assert _outputs(tmp_path / "ssv2") == _outputs(reference / "ssv2")
    assert not journal.exists()


def test_journal_repair_keeps_complete_rows(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.parquet"
    j = mf.Journal(manifest)
    j.append({"key": "1", "status": "ok"})
    j.close()
    with mf.journal_path(manifest).open("a") as f:
        f.write('{"key": "2", "sta')
    j = mf.Journal(manifest)
    j.append({"key": "3", "status": "ok"})
    j.close()
    assert sorted(mf.latest_by_key(manifest)) == ["1", "3"]


# ------------------------------------------------------------------------------- 4. environment


def _fake_ffmpeg(tmp_path: Path, message: str) -> Path:
    exe = tmp_path / "fake-ffmpeg"
    exe.write_text('#!/bin/sh\nfor a; do last="$a"; done\n'
                   'echo "[out#0/mp4 @ 0x5] Error opening output ${last#file:}: '
                   f'{message}" >&2\nexit 1\n')
    exe.chmod(0o755)
    return exe


@pytest.mark.parametrize("message",
                         ["No space left on device", "Read-only file system", "Permission denied"])
def test_environment_errors_stop_the_stage_and_blame_no_video(
        raw: Path, reference: Path, tmp_path: Path, message: str) -> None:
    args = ["prepare-ssv2", "--ssv2-root", str(raw / "ssv2"), "--data-dir", str(tmp_path), *FAST]
    proc = _cli(args, env={"FFMPEG": str(_fake_ffmpeg(tmp_path, message))})
    assert proc.returncode == EXIT_ENVIRONMENT, proc.stderr
    assert message in proc.stderr and "rerun" in proc.stderr and "Traceback" not in proc.stderr
    broken = set(json.loads((raw / "synthetic_info.json").read_text())["ssv2"]["broken"])
    rows = list(mf.read_rows(tmp_path / "ssv2/manifest.parquet"))
    # only truly broken sources are failed
    assert all(r["key"] in broken for r in rows if r["status"] != "ok")
    proc = _cli(args)  # space freed: the same command, no flags
    assert proc.returncode == 0, proc.stderr
    assert _outputs(tmp_path / "ssv2") == _outputs(reference / "ssv2")


def _filling_disk_ffmpeg(tmp_path: Path, ok_calls: int, message: bool = True) -> Path:
    """An ffmpeg that behaves like the real one on a disk that fills up after ``ok_calls``
    transcodes: it writes the output, of which the disk holds the start only, prints what ffmpeg
    prints and exits 0 (measured on a 64 KiB tmpfs: "Error writing trailer of file:<out>: No space
    left on device", "Error closing file ...", status 0). ``message=False``: an ffmpeg that says
    nothing about it."""
    exe, count = tmp_path / "filling-ffmpeg", tmp_path / "filling-ffmpeg.calls"
    words = ("Error writing trailer of {0}: No space left on device\\n"
             "Error closing file {0}: No space left on device\\n") if message else ""
    exe.write_text(f"""#!{sys.executable}
import os, subprocess, sys
calls = int(open({str(count)!r}).read()) + 1 if os.path.exists({str(count)!r}) else 1
open({str(count)!r}, "w").write(str(calls))
rc = subprocess.run([{ffmpeg_exe()!r}, *sys.argv[1:]]).returncode
out = [a for a in sys.argv if a.startswith("file:")][-1]
if rc == 0 and calls > {ok_calls}:  # on the disk: ftyp and half the frames, no moov (written last)
    data = open(out[5:], "rb").read()
    mdat = data[data.index(b"mdat") - 4:]
    open(out[5:], "wb").write(data[:int.from_bytes(data[:4], "big")] + mdat[:len(mdat) // 2])
    sys.stderr.write("{words}".format(out))
sys.exit(rc)
""")
    exe.chmod(0o755)
    return exe


def test_disk_filling_while_ffmpeg_writes_the_trailer_blames_no_video(raw: Path, reference: Path,
                                                                       tmp_path: Path) -> None:
    """Issue 21: ffmpeg exits 0 when the disk fills while it writes; the cut-off video used to be
    recorded as failed ("Invalid data found when processing input: '.../.4.mp4.tmp-...'") and only
    --retry-failed repaired it."""
    args = ["prepare-ssv2", "--ssv2-root", str(raw / "ssv2"), "--data-dir", str(tmp_path / "d"),
            *FAST]
    proc = _cli(args, env={"FFMPEG": str(_filling_disk_ffmpeg(tmp_path, ok_calls=2))})
    assert proc.returncode == EXIT_ENVIRONMENT, proc.stderr
    assert "No space left on device" in proc.stderr and "Traceback" not in proc.stderr
    broken = set(json.loads((raw / "synthetic_info.json").read_text())["ssv2"]["broken"])
    rows = list(mf.read_rows(tmp_path / "d/ssv2/manifest.parquet"))
    # written before the disk filled (a broken one may have had one of those two ffmpeg calls)
    assert 0 < sum(r["status"] == "ok" for r in rows) <= 2
    assert all(r["key"] in broken for r in rows if r["status"] != "ok")
    proc = _cli(args)  # space freed: the same command, no flags
    assert proc.returncode == 0, proc.stderr
    assert _outputs(tmp_path / "d/ssv2") == _outputs(reference / "ssv2")


@pytest.mark.parametrize("free", [0, 1 << 30])
def test_unreadable_output_on_a_full_disk_is_an_environment_error(
        raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """An ffmpeg that cuts its output off without a word: a full disk is to blame when there is no
    space left, the video otherwise (a real failure stays recorded)."""
    broken = set(json.loads((raw / "synthetic_info.json").read_text())["ssv2"]["broken"])
    videos = sorted((raw / "ssv2/20bn-something-something-v2").glob("*.webm"))
    src = next(p for p in videos if p.stem not in broken)
    fake = str(_filling_disk_ffmpeg(tmp_path, ok_calls=0, message=False))
    monkeypatch.setattr("pipeline.transcode.ffmpeg_exe", lambda: fake)
    real = os.statvfs

    def statvfs(path):  # the output folder's filesystem has ``free`` bytes left
        st = real(path)
        if Path(path) != tmp_path / "out":
            return st
        return os.statvfs_result((*st[:4], free // st.f_frsize, *st[5:]))

    monkeypatch.setattr(os, "statvfs", statvfs)
    item = Item("1", src, tmp_path / "out/1.mp4", "1.mp4")
    params = TranscodeParams(height=48, preset="ultrafast")
    if free:
        assert transcode(item, params, timeout=120)["status"] == "failed"
    else:
        with pytest.raises(EnvironmentFault, match="no space left on device"):
            transcode(item, params, timeout=120)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # no temp file left


def test_missing_ffmpeg_is_an_environment_error(raw: Path, tmp_path: Path) -> None:
    args = ["prepare-ssv2", "--ssv2-root", str(raw / "ssv2"), "--data-dir", str(tmp_path), *FAST]
    proc = _cli(args, env={"FFMPEG": str(tmp_path / "no/such/ffmpeg")})
    assert proc.returncode == EXIT_ENVIRONMENT and "cannot run ffmpeg" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert all(r["status"] == "failed" and "ffmpeg" not in (r["error"] or "")
               for r in mf.read_rows(tmp_path / "ssv2/manifest.parquet"))


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_unwritable_data_folder_gives_a_message_even_with_nothing_to_do(
        raw: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture, code: int) -> None:
    """Injected (the CI runs as root, where chmod does not stop writes): every write under the data
    folder fails."""
    data = _copy(reference, tmp_path)
    root = str(data)
    real_os_open, real_open = os.open, io.open

    def deny(path) -> None:
        if os.path.abspath(os.fspath(path)).startswith(root):
            raise OSError(code, os.strerror(code), os.fspath(path))

    def os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND):
            deny(path)
        return real_os_open(path, flags, *a, **k)

    def open_(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            deny(file)
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(builtins, "open", open_)
    rc = cli_main(["prepare-ssv2", "--ssv2-root", str(raw / "ssv2"), "--data-dir", root, *FAST])
    log = capsys.readouterr().err
    assert rc == EXIT_ENVIRONMENT
    assert os.strerror(code) in log and "rerun" in log
    monkeypatch.undo()
    assert _outputs(data / "ssv2") == _outputs(reference / "ssv2")


# ------------------------------------------------------------------------------- 5. lock


def _holder(folder: Path, seconds: float) -> subprocess.Popen:
    code = ("import sys, time; from pathlib import Path; from tstl.core.lock import dataset_lock\n"
            f"with dataset_lock(Path({str(folder)!r}), 'prepare-ssv2'):\n"
            f"    print('held', flush=True); time.sleep({seconds})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_exits_at_once_naming_the_holder_or_waits(
        raw: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _copy(reference, tmp_path)
    args = ["prepare-ssv2", "--ssv2-root", str(raw / "ssv2"), "--data-dir", str(data), *FAST]
    holder = _holder(data / "ssv2", 60)
    try:
        start = time.monotonic()
        assert cli_main(args) == EXIT_LOCKED
        assert cli_main(["finalize", str(data / "ssv2")]) == EXIT_LOCKED
        log = capsys.readouterr().err
        assert time.monotonic() - start < 10
        assert f"pid {holder.pid}" in log and "--wait-lock" in log
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed holder leaves no stale lock
        holder.wait()
    assert cli_main(args) == 0
    holder = _holder(data / "ssv2", 1.5)
    start = time.monotonic()
    assert cli_main(args + ["--wait-lock"]) == 0
    assert time.monotonic() - start > 0.5
    holder.wait()


# ------------------------------------------------------------------------------- 10. frame geometry


@pytest.mark.parametrize("size,reason", [("16x2400", "a side is under 32 px"),
                                         ("4000x16", "a side is under 32 px"),
                                         ("40x400", "aspect ratio over 8")])
def test_absurd_frame_sizes_are_bad_videos_with_a_reason(
        tmp_path: Path, size: str, reason: str) -> None:
    src = tmp_path / f"v{size}.avi"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i",
                    f"testsrc=size={size}:rate=10", "-frames:v", "10", "-c:v", "mpeg4", "-q:v",
                    "31", str(src)], check=True)
    src.write_bytes(src.read_bytes() + b"\0" * 2048)  # above the minimum source size
    out = tmp_path / "out.mp4"
    result = transcode(Item("k", src, out, out.name), PARAMS, timeout=60)
    assert (result["status"] == "failed"
            and result["error"] == f"not a usable video: frame size {size}: {reason}")
    assert not out.exists()
