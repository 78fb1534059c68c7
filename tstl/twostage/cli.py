"""TSTL command line: ``python -m tstl.twostage.cli groups ...``."""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

from tstl.log import init_logging
from tstl.twostage.groups import balanced_groups, confusion_groups, load_groups, save_groups

logger = logging.getLogger(__name__)


def _groups(args: argparse.Namespace) -> int:
    if args.method == "balanced":
        if not args.num_classes:
            raise SystemExit("--method balanced needs --num-classes N")
        groups = balanced_groups(args.num_classes, args.num_groups)
    else:
        if not args.confusion:
            raise SystemExit("--method confusion needs --confusion FILE.npy (a [C, C] matrix, rows = true class)")
        groups = confusion_groups(np.load(args.confusion), args.num_groups)
    save_groups(groups, args.out, args.format)
    load_groups(args.out)  # re-validate what was written
    logger.info("wrote %d groups of %d classes to %s", groups.num_groups, groups.num_classes, args.out)
    for g, members in enumerate(groups.groups):
        print(f"group {g}: {list(members)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the sub-command."""
    init_logging()
    p = argparse.ArgumentParser(prog="python -m tstl.twostage.cli", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("groups", help="write a class-group file (balanced-contiguous or from a confusion matrix)")
    g.add_argument("--method", choices=["balanced", "confusion"], default="balanced")
    g.add_argument("--num-groups", type=int, required=True, help="number of groups K")
    g.add_argument("--num-classes", type=int, default=0, help="classes N (balanced method)")
    g.add_argument("--confusion", help="[N, N] .npy confusion matrix of a trained B-CAST (confusion method)")
    g.add_argument("--format", choices=["ours", "tstl"], default="ours", help="output format (see docs/tstl.md)")
    g.add_argument("--out", required=True, help="output JSON file")
    args = p.parse_args(argv)
    return _groups(args)


if __name__ == "__main__":
    sys.exit(main())
