"""TSTL command line: ``python -m tstl.twostage.cli {groups,train,eval}``.

``train`` runs stage 1 (selector) and stage 2 (experts) through the ordinary trainer and resumes where a killed run
stopped; ``eval`` writes the routed multi-view report. Both take the YAML files of ``make train`` plus
``configs/tstl/*.yaml`` and dotted overrides (``tstl.expert.epochs=5``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from tstl.core.config import ConfigError, load_cli_config
from tstl.core.log import init_logging
from tstl.twostage.config import TSTLConfig
from tstl.twostage.evaluate import evaluate_tstl
from tstl.twostage.groups import GroupFileError, balanced_groups, confusion_groups, load_groups, save_groups
from tstl.train.preemption import EXIT_PREEMPTED, Preempted
from tstl.twostage.train import train_two_stage

logger = logging.getLogger("tstl.twostage")


def _config(files: list[Path], overrides: list[str]) -> TSTLConfig:
    cfg = load_cli_config(TSTLConfig, files, overrides)
    cfg.check()
    return cfg


def _train(args: argparse.Namespace) -> int:
    try:
        train_two_stage(_config(args.config, args.overrides))
    except Preempted as e:  # the stage in progress saved on SIGTERM/SIGUSR1: rerun to resume it
        logger.warning("%s", e)
        return EXIT_PREEMPTED
    return 0


def _eval(args: argparse.Namespace) -> int:
    # key=value words typed after --experts are overrides, not checkpoint paths
    experts = [p for p in args.experts or [] if "=" not in str(p)]
    cfg = _config(args.config, args.overrides + [str(p) for p in args.experts or [] if "=" in str(p)])
    res, report = evaluate_tstl(cfg, args.selector, experts, args.out)
    if res is not None:  # rank 0
        s = res["summary"]
        print(json.dumps({"selector_acc": s["selector_acc"],
                          **{k: {"top1": v["top1"], "top5": v["top5"]} for k, v in s["methods"].items()},
                          "report": str(report / "report.md")}, indent=1))
    return 0


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
    p = argparse.ArgumentParser(prog="python -m tstl.twostage.cli", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="stage 1 (selector) then stage 2 (experts); resumes a killed run")
    t.add_argument("--config", type=Path, nargs="+", required=True, help="YAML files, later ones override earlier")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tstl.num_groups=4 tstl.expert.epochs=5")
    t.set_defaults(fn=_train)
    e = sub.add_parser("eval", help="routed multi-view evaluation (hard and soft) next to a single B-CAST")
    e.add_argument("--config", type=Path, nargs="+", required=True, help="the YAML files the run was trained with")
    e.add_argument("--selector", type=Path, help="a released selector checkpoint (CAST layout) instead of the run's")
    e.add_argument("--experts", type=Path, nargs="+", help="released expert checkpoints, one per group, in order")
    e.add_argument("--out", type=Path, help="report folder (default <out_dir>/eval)")
    e.add_argument("overrides", nargs="*")
    e.set_defaults(fn=_eval)
    for launched in (p, t, e):  # the deepspeed launcher passes --local_rank=N; we read LOCAL_RANK from the env
        launched.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    g = sub.add_parser("groups", help="write a class-group file (balanced-contiguous or from a confusion matrix)")
    g.add_argument("--method", choices=["balanced", "confusion"], default="balanced")
    g.add_argument("--num-groups", type=int, required=True, help="number of groups K")
    g.add_argument("--num-classes", type=int, default=0, help="classes N (balanced method)")
    g.add_argument("--confusion", help="[N, N] .npy confusion matrix of a trained B-CAST (confusion method)")
    g.add_argument("--format", choices=["ours", "tstl"], default="ours", help="output format (see docs/tstl.md)")
    g.add_argument("--out", required=True, help="output JSON file")
    g.set_defaults(fn=_groups)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, GroupFileError, FileNotFoundError) as err:
        logger.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
