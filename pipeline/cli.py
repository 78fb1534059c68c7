"""Command line of the offline stages: ``tstl {prepare-<dataset>,prepare,finalize} ...`` (also
``python -m pipeline.cli ...``).

One ``prepare-<name>`` subcommand per dataset of the registry (``tstl.core.datasets``), plus the
generic ``prepare --dataset <name>``. The raw root is ``--root`` (alias ``--<name>-root``), else the
dataset's Make variable in the environment (``SSV2_ROOT``, ``UCF101_ROOT``, ``K400_ROOT``: the
Makefile exports them), else ``<data-dir>/raw/<name>``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipeline.errors import (
    EXIT_BAD_INPUT,
    EXIT_ENVIRONMENT,
    EXIT_FAILURES,
    EXIT_LOCKED,
    EnvironmentFault,
    is_environment_error,
)
from pipeline.prepare import PrepareOptions, finalize, prepare, transcode_params
from pipeline.runner import Summary, parse_part
from pipeline.transcode import TranscodeParams
from tstl.core.datasets import DATASETS, Dataset, MetadataError, get_dataset
from tstl.core.lock import LockedError

logger = logging.getLogger("pipeline")

PROG = "python -m pipeline.cli"
# the convention of every tool (tstl.core.exitcodes) with this stage's meaning of each code
EPILOG = ("exit codes: 0 done; 1 more videos failed than --max-failure-fraction; 2 bad input "
          "(metadata, arguments, a wrong path); 3 environment error (disk full, read-only or "
          "forbidden folder, no ffmpeg: fix it and rerun, no video was marked failed); 4 another "
          "run holds the dataset folder (see --wait-lock)")


def _lock_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait-lock", action="store_true",
                   help="if another run holds the dataset folder, wait for it "
                                                            "instead of exiting with code 4")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, required=True,
                   help="output root; writes <data-dir>/<dataset>/...")
    p.add_argument("--jobs", type=int, default=os.cpu_count(),
                   help="parallel ffmpeg processes (default: all cores)")
    p.add_argument("--part", default="1/1",
                   help="process share i of n (e.g. 3/8) for Slurm arrays or several "
                                                 "machines; then run `finalize` once (default 1/1)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds allowed per video (default 300)")
    p.add_argument("--max-failure-fraction", type=float, default=0.05,
                   help="exit non-zero when more than this fraction of videos fail (default 0.05)")
    p.add_argument("--retry-failed", action="store_true",
                   help="retry videos that failed before (default: a "
                                                               "failed video is retried only "
                                                               "when its source changes)")
    p.add_argument("--crf", type=int, default=TranscodeParams.crf,
                   help="x264 quality (default %(default)s)")
    p.add_argument("--preset", default=TranscodeParams.preset,
                   help="x264 preset (default %(default)s)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--height", type=int,
                      help="output height (default: the dataset's, 240 for SSV2 and UCF101)")
    size.add_argument("--short-side", type=int,
                      help="scale so the shorter side has this length (default: the "
                                                     "dataset's, 320 for Kinetics-400)")
    p.add_argument("--max-missing-fraction", type=float,
                   help="for datasets whose releases normally lack some videos (Kinetics: YouTube "
                        "removals): exit non-zero when more than this fraction of the listed "
                        "videos is missing (default: the dataset's, 0.25 for Kinetics-400); "
                        "missing videos do not count as failures there. Other datasets count a "
                        "missing video as a failure")
    _lock_arg(p)


def _root_arg(p: argparse.ArgumentParser, ds: Dataset | None) -> None:
    names = ["--root"] + ([f"--{ds.name}-root"] if ds else [])
    var = ds.root_var if ds else "<dataset's *_ROOT variable>"
    p.add_argument(*names, dest="root", type=Path,
                   help=f"{ds.root_help if ds else 'the raw release folder'} (default: ${var}, "
                        "else <data-dir>/raw/<dataset>)")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Offline dataset preparation stages. "
                                     "Every stage is parallel, atomic and resumable: rerun it "
                                     "to finish or repair.",
                                     epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)
    for ds in DATASETS.values():
        p = sub.add_parser(f"prepare-{ds.name}",
                           help=f"{ds.title}: videos -> H.264 .mp4 + annotation CSVs + manifest",
                           epilog=EPILOG)
        p.set_defaults(dataset=ds.name)
        _root_arg(p, ds)
        _common(p)
    p = sub.add_parser("prepare", help="any registered dataset: prepare --dataset <name>",
                       epilog=EPILOG)
    p.add_argument("--dataset", required=True, choices=list(DATASETS), help="registered dataset")
    _root_arg(p, None)
    _common(p)
    p = sub.add_parser("finalize",
                       help="merge the manifests of --part runs and write the annotation CSVs",
                       epilog=EPILOG)
    p.add_argument("dataset_dir", type=Path, help="<data-dir>/<dataset>, e.g. data/ssv2")
    _lock_arg(p)
    return parser


def _root(args: argparse.Namespace, ds: Dataset) -> Path:
    if args.root is not None:
        return args.root
    env = os.environ.get(ds.root_var)
    return Path(env) if env else args.data_dir / "raw" / ds.name


def _too_many_failures(summary: Summary, ds: Dataset, args: argparse.Namespace) -> str | None:
    """Why the run should exit 1, or None. Datasets whose releases normally lack videos
    (``max_missing_fraction`` set) count missing sources apart: the failure limit applies to broken
    videos among those present."""
    if ds.max_missing_fraction is None:
        failed, total = len(summary.failures), summary.total
    else:
        limit = (ds.max_missing_fraction if args.max_missing_fraction is None
                 else args.max_missing_fraction)
        if summary.total and summary.missing / summary.total > limit:
            share = 100 * summary.missing / summary.total
            return (f"{summary.missing} of {summary.total} listed videos are missing ({share:.1f}% "
                    f"> --max-missing-fraction {100 * limit:.1f}%): is ${ds.root_var} the folder "
                    "of the release? The list is in annotations/missing.txt")
        failed, total = summary.broken, summary.total - summary.missing
    if total and failed / total > args.max_failure_fraction:
        return (f"{failed} of {total} videos failed ({100 * failed / total:.1f}% > "
                f"--max-failure-fraction {100 * args.max_failure_fraction:.1f}%); see the "
                "manifest for reasons")
    return None


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    from tstl.core.log import init_logging

    args = build_parser(prog).parse_args(argv)
    init_logging()
    try:
        if args.command == "finalize":
            finalize(args.dataset_dir, wait_lock=args.wait_lock)
            return 0
        ds = get_dataset(args.dataset)
        params = transcode_params(ds, args.height, args.short_side, crf=args.crf,
                                  preset=args.preset)
        opts = PrepareOptions(data_dir=args.data_dir, jobs=max(1, args.jobs),
                              part=parse_part(args.part), timeout=args.timeout,
                              retry_failed=args.retry_failed, wait_lock=args.wait_lock,
                              params=params)
        summary = prepare(ds, _root(args, ds), opts)
    except LockedError as e:
        logger.error("%s", e)
        return EXIT_LOCKED
    except (MetadataError, ValueError, RuntimeError) as e:
        logger.error("%s", e)
        return EXIT_BAD_INPUT
    except (EnvironmentFault, OSError) as e:
        if not is_environment_error(e):
            raise
        logger.error("%s: stopped by an environment error: %s. Free space or fix the folder's "
                     "permissions (or install ffmpeg), then rerun the same command: no video was "
                     "recorded as failed because of it",
                     args.command, e)
        return EXIT_ENVIRONMENT
    problem = _too_many_failures(summary, ds, args)
    if problem:
        logger.error("%s", problem)
        return EXIT_FAILURES
    return 0


def run() -> None:
    """Console-script entry point (``tstl-prepare``, an alias of
    ``tstl prepare-<dataset>``/``finalize``)."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
