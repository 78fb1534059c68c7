"""Command line of the offline stages: ``python -m pipeline.cli {prepare-ssv2,prepare-ucf101,finalize} ...``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tstl.core.lock import LockedError
from pipeline.errors import (EXIT_BAD_INPUT, EXIT_ENVIRONMENT, EXIT_FAILURES, EXIT_LOCKED, EnvironmentFault,
                             is_environment_error)
from pipeline.prepare import PrepareOptions, finalize, prepare_ssv2, prepare_ucf101
from pipeline.runner import parse_part
from pipeline.ssv2 import MetadataError
from pipeline.transcode import TranscodeParams

logger = logging.getLogger("pipeline")

EPILOG = ("exit codes: 0 done; 1 more videos failed than --max-failure-fraction; 2 bad input (metadata, "
          "arguments); 3 environment error (disk full, read-only or forbidden folder, no ffmpeg: fix it and rerun, no "
          "video was marked failed); 4 another run holds the dataset folder (see --wait-lock)")


def _lock_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait-lock", action="store_true", help="if another run holds the dataset folder, wait for it "
                                                            "instead of exiting with code 4")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, required=True, help="output root; writes <data-dir>/<dataset>/...")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel ffmpeg processes (default: all cores)")
    p.add_argument("--part", default="1/1", help="process share i of n (e.g. 3/8) for Slurm arrays or several "
                                                 "machines; then run `finalize` once (default 1/1)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per video (default 300)")
    p.add_argument("--max-failure-fraction", type=float, default=0.05,
                   help="exit non-zero when more than this fraction of videos fail (default 0.05)")
    p.add_argument("--retry-failed", action="store_true", help="retry videos that failed before (default: a "
                                                               "failed video is retried only when its source changes)")
    p.add_argument("--crf", type=int, default=TranscodeParams.crf, help="x264 quality (default %(default)s)")
    p.add_argument("--preset", default=TranscodeParams.preset, help="x264 preset (default %(default)s)")
    p.add_argument("--height", type=int, default=TranscodeParams.height, help="output height (default 240)")
    _lock_arg(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.cli", description="Offline dataset preparation stages. "
                                     "Every stage is parallel, atomic and resumable: rerun it to finish or repair.",
                                     epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare-ssv2", help="SSV2 .webm -> H.264 .mp4 + annotation CSVs + manifest")
    p.add_argument("--ssv2-root", type=Path, required=True,
                   help="folder with labels/ and 20bn-something-something-v2/ (or the .webm files directly)")
    _common(p)
    p = sub.add_parser("prepare-ucf101", help="UCF101 .avi -> .mp4 + CSVs of the three splits + manifest")
    p.add_argument("--ucf101-root", type=Path, required=True, help="folder with UCF-101/ and ucfTrainTestlist/")
    _common(p)
    p = sub.add_parser("finalize", help="merge the manifests of --part runs and write the annotation CSVs")
    p.add_argument("dataset_dir", type=Path, help="e.g. data/ssv2")
    _lock_arg(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tstl.core.log import init_logging

    args = build_parser().parse_args(argv)
    init_logging()
    try:
        if args.command == "finalize":
            finalize(args.dataset_dir, wait_lock=args.wait_lock)
            return 0
        opts = PrepareOptions(data_dir=args.data_dir, jobs=max(1, args.jobs), part=parse_part(args.part),
                              timeout=args.timeout, retry_failed=args.retry_failed, wait_lock=args.wait_lock,
                              params=TranscodeParams(height=args.height, crf=args.crf, preset=args.preset))
        if args.command == "prepare-ssv2":
            summary = prepare_ssv2(args.ssv2_root, opts)
        else:
            summary = prepare_ucf101(args.ucf101_root, opts)
    except LockedError as e:
        logger.error("%s", e)
        return EXIT_LOCKED
    except (MetadataError, ValueError, RuntimeError) as e:
        logger.error("%s", e)
        return EXIT_BAD_INPUT
    except (EnvironmentFault, OSError) as e:
        if not is_environment_error(e):
            raise
        logger.error("%s: stopped by an environment error: %s. Free space or fix the folder's permissions (or "
                     "install ffmpeg), then rerun the same command: no video was recorded as failed because of it",
                     args.command, e)
        return EXIT_ENVIRONMENT
    if summary.failed_fraction > args.max_failure_fraction:
        logger.error("%d of %d videos failed (%.1f%% > --max-failure-fraction %.1f%%); see the manifest for reasons",
                     len(summary.failures), summary.total, 100 * summary.failed_fraction,
                     100 * args.max_failure_fraction)
        return EXIT_FAILURES
    return 0


if __name__ == "__main__":
    sys.exit(main())
