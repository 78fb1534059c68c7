"""Transcode benchmark: our stage against plain ffmpeg on the same files with the same parallelism.

Both sides run the identical ffmpeg argument list with ``jobs`` concurrent processes; the stage adds
source checks, output probing, atomic renames and the manifest. Also timed: a rerun with nothing to
do. Writes the "transcode" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.report import update_section
from pipeline.prepare import PrepareOptions, prepare_ssv2
from pipeline.synthetic import SynthConfig, generate
from pipeline.transcode import TranscodeParams, build_command, ffmpeg_version
from tstl.core.datasets.ssv2 import read_annotations, video_dir

logger = logging.getLogger(__name__)


def _direct(sources: list[Path], out: Path, jobs: int) -> float:
    """Plain ffmpeg, same argv, same parallelism; returns seconds."""
    out.mkdir(parents=True)
    params = TranscodeParams()

    def one(src: Path) -> None:
        subprocess.run(build_command(src, out / f"{src.stem}.mp4", params), check=False,
                       capture_output=True)

    start = time.perf_counter()
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, sources))
    return time.perf_counter() - start


def run(videos_per_class: int, jobs: int, work: Path) -> dict:
    cfg = SynthConfig(seed=0, videos_per_class=videos_per_class, broken_ssv2=0,
                      duration_s=(1.5, 3.0))
    generate(cfg, work / "raw", datasets=("ssv2",), jobs=jobs)
    root = work / "raw" / "ssv2"
    ann = read_annotations(root)
    ids = [v for rows in ann.splits.values() for v, _ in rows] + ann.test_ids
    sources = [video_dir(root) / f"{v}.webm" for v in ids]
    # Warm the page cache for both sides alike.
    for s in sources:
        s.read_bytes()
    t_direct = _direct(sources, work / "direct", jobs)
    start = time.perf_counter()
    prepare_ssv2(root, PrepareOptions(data_dir=work / "data", jobs=jobs))
    t_stage = time.perf_counter() - start
    start = time.perf_counter()
    summary = prepare_ssv2(root, PrepareOptions(data_dir=work / "data", jobs=jobs))
    t_noop = time.perf_counter() - start
    assert summary.done == 0, "the rerun should have had nothing to do"
    return {"videos": len(sources), "jobs": jobs, "direct_s": t_direct, "stage_s": t_stage,
            "noop_s": t_noop}


def markdown(r: dict) -> str:
    ratio = r["direct_s"] / r["stage_s"]
    stage_rate = r["videos"] / r["stage_s"]
    return f"""## Transcode stage (`python -m benchmarks.transcode`)

{r['videos']} synthetic SSV2-style VP9 clips (1.5-3 s, 240 px high) -> H.264 240p, {r['jobs']}
parallel jobs, {platform.processor() or platform.machine()}, {os.cpu_count()} cores,
{ffmpeg_version()[:40]}.

| run | seconds | videos/s |
|---|---|---|
| plain ffmpeg, same argv and parallelism | {r['direct_s']:.2f} | \
{r['videos'] / r['direct_s']:.1f} |
| `prepare-ssv2` stage (checks, probe, atomic rename, manifest) | {r['stage_s']:.2f} | \
{stage_rate:.1f} |
| rerun with nothing to do | {r['noop_s']:.2f} | |

Throughput ratio stage / plain ffmpeg: **{ratio:.3f}** (target >= 0.95).
"""


def main(argv: list[str] | None = None) -> None:
    from tstl.core.log import init_logging

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                prog="python -m benchmarks.transcode")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"), help="report to update")
    p.add_argument("--videos-per-class", type=int, default=125,
                   help="8 classes x this many videos (default 1,000)")
    p.add_argument("--jobs", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    init_logging()
    work = Path(tempfile.mkdtemp(prefix="bench-transcode-"))
    try:
        result = run(args.videos_per_class, args.jobs, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    update_section(args.out, "transcode", markdown(result))
    logger.info("transcode: %s", result)


if __name__ == "__main__":
    main()
