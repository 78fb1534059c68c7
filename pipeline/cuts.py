"""Cut many clips from one long source video in one ffmpeg pass: the source is decoded once, not
once per clip.

EPIC-KITCHENS-100 has 90k narrations in 700 videos of up to an hour of 1080p at 50-60 fps; cutting
each narration with its own ffmpeg would decode the same frames again for every overlapping or
nearby narration and seek into the video 90k times. Here the clips of a source are taken in time
order, ``MAX_CLIPS`` at a time (a new pass also starts after a gap of ``MAX_GAP_S`` without
narrations, so the gap is skipped by seeking instead of decoded), and each pass is one ffmpeg
process: ``split`` fans the decoded frames out to one ``trim=start:end`` branch per clip, then each
branch is reset to start at 0, scaled and encoded to its own file with the options of every prepared
video.

Why the outputs do not depend on how the clips were grouped into passes (so a killed stage, rerun
with only the clips not yet done, writes the same bytes): timestamps are the source's own (``-copyts
-start_at_zero``), so each ``trim`` selects the frames of ``[start, stop)`` by absolute time
whatever the pass' seek point (``-ss`` only skips decoding up to the keyframe before the pass' first
clip); each clip's encoder sees the same frames with the same timestamps; the encoders are
single-threaded with bit-exact flags.
"""

from __future__ import annotations

import os
import subprocess
from collections import defaultdict
from pathlib import Path

import av
import ffmpeg

from pipeline.errors import EnvironmentFault
from pipeline.runner import Item
from pipeline.transcode import (
    GLOBAL_ARGS,
    TranscodeParams,
    check_source,
    disk_full,
    ffmpeg_version,
    output_options,
    probe_mp4,
    run_ffmpeg,
    tmp_name,
)
from tstl.core.faults import fault_point
from tstl.core.ffmpeg import ffmpeg_exe

MAX_CLIPS = 32
"""Clips per ffmpeg pass: one encoder and one open file each (EK100's longest videos hold ~700
narrations)."""
MAX_GAP_S = 30.0
"""A gap this long without clips ends a pass: the next one seeks past it instead of decoding it."""


Segment = tuple[float, float]


def plan_passes(items: list[Item], max_clips: int = MAX_CLIPS,
                max_gap: float = MAX_GAP_S) -> list[list[Item]]:
    """The passes over each source: its clips in time order, cut into runs of at most ``max_clips``
    without a gap of ``max_gap`` seconds. Items without a segment (a whole video) are a pass of
    their own."""
    by_source: dict[Path, list[Item]] = defaultdict(list)
    passes: list[list[Item]] = []
    for item in items:
        if item.segment is None:
            passes.append([item])
        else:
            by_source[item.source].append(item)
    for source in sorted(by_source):
        clips = sorted(by_source[source], key=lambda i: (i.segment, i.key))
        current: list[Item] = []
        reach = 0.0  # the latest stop of the current pass
        for item in clips:
            start, stop = _segment(item)
            if current and (len(current) >= max_clips or start - reach > max_gap):
                passes.append(current)
                current = []
            reach = max(reach, stop) if current else stop
            current.append(item)
        if current:
            passes.append(current)
    return passes


def _segment(item: Item) -> Segment:
    if item.segment is None:
        raise ValueError(f"{item.key}: a clip needs a segment of its source")
    return item.segment


def clear_stale_temps(items: list[Item]) -> None:
    """Remove the temp files a killed run left for these items' outputs: one listing per output
    folder (a per-clip glob would list EK100's 90k-clip folder 90k times), only these items' names
    (parallel ``--part`` runs share the folder)."""
    names: dict[Path, set[str]] = defaultdict(set)
    for item in items:
        names[item.output.parent].add(item.output.name)
    for folder, wanted in names.items():
        if not folder.is_dir():
            continue
        with os.scandir(folder) as it:
            for entry in it:
                name = entry.name
                stale = name.startswith(".") and ".tmp-" in name
                if stale and name[1:].split(".tmp-")[0] in wanted:
                    Path(entry.path).unlink(missing_ok=True)


def plan(items: list[Item]) -> list[list[Item]]:
    """The ``Batched`` plan of the cut stage: clear these items' stale temp files, then
    ``plan_passes``."""
    clear_stale_temps(items)
    return plan_passes(items)


def pass_timeout(items: list[Item], timeout: float) -> float:
    """``timeout`` per minute of source the pass decodes (at least ``timeout``)."""
    span = max(_segment(i)[1] for i in items) - min(_segment(i)[0] for i in items)
    return timeout * max(1.0, span / 60.0)


def build_pass_command(src: Path, clips: list[tuple[Path, Segment]],
                       p: TranscodeParams) -> list[str]:
    """The ffmpeg argv that writes each ``(output, (start, stop))`` of ``clips`` from ``src`` in one
    decode."""
    first = min(seg[0] for _, seg in clips)
    inp = ffmpeg.input(f"file:{src}", ss=f"{first:.3f}", copyts=None, start_at_zero=None)
    fan = inp.video.split()
    outs = []
    for k, (dst, (start, stop)) in enumerate(clips):
        v = fan[k].trim(start=f"{start:.3f}", end=f"{stop:.3f}").setpts("PTS-STARTPTS")
        v = v.filter("scale", *p.scale())
        outs.append(ffmpeg.output(v, f"file:{dst}", **output_options(p)))
    # one filter thread: passes run one per core already, and scaled frames must not depend on the
    # machine
    cmd = ffmpeg.merge_outputs(*outs).global_args(*GLOBAL_ARGS, "-filter_complex_threads", "1")
    return ffmpeg.compile(cmd, cmd=ffmpeg_exe(), overwrite_output=True)


SHORT_SOURCE = "the source is short or truncated; download the video again"


def _precheck(item: Item, source_seconds: float | None) -> str | None:
    """Why ``item`` cannot be cut at all, or None."""
    start, stop = _segment(item)
    if stop <= start:
        return f"empty segment {start:.2f}-{stop:.2f} s (stop_timestamp not after start_timestamp)"
    if source_seconds and start >= source_seconds:
        return (f"segment {start:.2f}-{stop:.2f} s starts after the end of the source "
                f"({source_seconds:.2f} s): {SHORT_SOURCE}")
    return None


def _no_disk_to_blame(item: Item, e: Exception) -> None:
    """A clip we wrote that is unreadable or short on a full disk is the disk's fault, not the
    video's (``transcode.disk_full``): ``EnvironmentFault``, nothing recorded against the clip."""
    if disk_full(item.output.parent):
        raise EnvironmentFault(f"{item.output}: no space left on device while writing it ({e})")


def _finish(item: Item, tmp: Path, source_seconds: float | None) -> dict:
    """Check one written clip and move it to its final name; the manifest fields."""
    start, stop = _segment(item)
    try:
        out = probe_mp4(tmp)
    except (av.error.FFmpegError, OSError, IndexError) as e:
        _no_disk_to_blame(item, e)
        return {"status": "failed", "error": f"segment {start:.2f}-{stop:.2f} s: no readable clip "
                                             f"was written ({type(e).__name__}: {e})"}
    # check_complete's rule: frames covering under 90% of the segment (less 0.2 s): the source
    # ended early
    if out["frames"] == 0 or out["duration"] < 0.9 * (stop - start) - 0.2:
        _no_disk_to_blame(item, ValueError(f"{out['frames']} frames"))
        where = f"; the source announces {source_seconds:.2f} s" if source_seconds else ""
        return {"status": "failed",
                "error": f"segment {start:.2f}-{stop:.2f} s: the clip holds {out['frames']} frames "
                         f"({out['duration']:.2f} s){where}: {SHORT_SOURCE}"}
    fault_point("rename:video")
    os.replace(tmp, item.output)
    return {"status": "ok", "error": None, "source_frames": None, "ffmpeg": ffmpeg_version(),
            **{k: out[k] for k in ("frames", "fps", "width", "height", "duration")}}


def cut_clips(items: list[Item], params: TranscodeParams, timeout: float) -> list[dict]:
    """Cut every item (one source, each with a segment) in one ffmpeg pass; one manifest result per
    item, in order."""
    try:
        seconds = check_source(items[0].source)["header_duration"]
    except ValueError as e:
        return [{"status": "failed", "error": str(e)} for _ in items]
    results = {i.key: {"status": "failed", "error": why} for i in items
               if (why := _precheck(i, seconds)) is not None}
    todo = [(i, tmp_name(i.output)) for i in items if i.key not in results]
    try:
        if todo:
            for folder in {i.output.parent for i, _ in todo}:
                folder.mkdir(parents=True, exist_ok=True)
            argv = build_pass_command(items[0].source, [(t, _segment(i)) for i, t in todo], params)
            names = {t: i.output for i, t in todo}
            error = run_ffmpeg(argv, pass_timeout([i for i, _ in todo], timeout), names)
            for item, tmp in todo:
                results[item.key] = ({"status": "failed", "error": error} if error
                                     else _finish(item, tmp, seconds))
    except subprocess.TimeoutExpired as e:
        why = f"the ffmpeg pass over {len(todo)} clips took longer than {e.timeout:.0f} s"
        results.update({i.key: {"status": "timeout", "error": why} for i, _ in todo})
    finally:
        for _, tmp in todo:
            tmp.unlink(missing_ok=True)
    return [results[i.key] for i in items]
