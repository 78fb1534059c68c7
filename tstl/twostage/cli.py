"""TSTL command line: ``tstl {groups,train-tstl,eval-tstl}`` (also
``python -m tstl.twostage.cli {groups,train,eval}``).

``train`` runs stage 1 (selector) and stage 2 (experts) through the ordinary trainer and resumes
where a killed run stopped; ``eval`` writes the routed multi-view report. Both take the YAML files
of ``make train`` plus ``configs/tstl/*.yaml`` and dotted overrides (``tstl.expert.epochs=5``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tstl.core import exitcodes
from tstl.core.config import ConfigError, load_cli_config
from tstl.core.exitcodes import UsageError
from tstl.core.log import init_logging
from tstl.train import runlog
from tstl.train.cli import HelpConfig, add_launch_args, run_command
from tstl.twostage.config import TSTLConfig
from tstl.twostage.groups import (
    GroupFileError,
    balanced_groups,
    confusion_groups,
    load_groups,
    save_groups,
)

logger = logging.getLogger("tstl.twostage")

PROG = "python -m tstl.twostage.cli"


def _config(files: list[Path], overrides: list[str]) -> TSTLConfig:
    from tstl.train.preflight import check_config_files

    check_config_files(files)
    return load_cli_config(TSTLConfig, files, overrides)  # runs TSTLConfig.check once


def _preflight(cfg: TSTLConfig, train: bool) -> None:
    """Shard sets, group file, model and init checkpoints before any stage starts (exit 2 with the
    fix, not a late traceback on every rank)."""
    from tstl.train.preflight import check_init, check_model, check_shards
    from tstl.twostage.train import refuse_multi_head

    check_shards(cfg, [cfg.train_split, cfg.val_split] if train else [cfg.val_split])
    refuse_multi_head(cfg, cfg.train_split if train else cfg.val_split)
    pinned = Path(cfg.out_dir) / "groups.json"  # a started run compares against its pinned copy
    if cfg.tstl.groups and not Path(cfg.tstl.groups).is_file() and not (train and pinned.is_file()):
        raise UsageError(f"tstl.groups: group file not found: {cfg.tstl.groups}",
                         "write one with `tstl groups` (make groups) or leave tstl.groups empty "
                         "for balanced groups")
    check_model(cfg.model, cfg.model.num_classes)
    if train:
        cfg.check_weights()  # what train_two_stage refuses, said before any launch
        check_init(cfg.model)
        check_init(cfg.model, cfg.tstl.init, key="tstl.init")


def _train(args: argparse.Namespace) -> int:
    cfg = _config(args.config, args.overrides)
    _preflight(cfg, train=True)
    if args.check:
        print(f"ok: TSTL {cfg.dataset} {cfg.model.name}: config, model and shard sets are ready; "
              f"out_dir {cfg.out_dir}")
        return exitcodes.OK
    from tstl.train.preemption import Preempted, handle_signals
    from tstl.twostage.train import train_two_stage

    runlog.attach(Path(cfg.out_dir), "train-tstl")
    with handle_signals():  # one watch for every stage: a signal between two stops the next one
        try:
            train_two_stage(cfg)
        except Preempted as e:  # the stage in progress saved on SIGTERM/SIGUSR1: rerun to resume it
            logger.warning("%s", e)
            return exitcodes.PREEMPTED
    return exitcodes.OK


def _eval(args: argparse.Namespace) -> int:
    # key=value words typed after --experts are overrides, not checkpoint paths
    experts = [p for p in args.experts or [] if "=" not in str(p)]
    cfg = _config(args.config,
                  args.overrides + [str(p) for p in args.experts or [] if "=" in str(p)])
    _preflight(cfg, train=False)
    for path in [args.selector, *experts] if args.selector else experts:
        if not Path(path).exists():
            raise UsageError(f"checkpoint not found: {path}",
                             "give released checkpoint files or leave out "
                             "--selector/--experts to use the run's own stages")
    from tstl.twostage.evaluate import evaluate_tstl

    runlog.attach(Path(args.out or Path(cfg.out_dir) / "eval"), "eval-tstl")  # the report folder
    res, report = evaluate_tstl(cfg, args.selector, experts, args.out)
    if res is not None:  # rank 0
        s = res["summary"]
        print(json.dumps({"selector_acc": s["selector_acc"],
                          **{k: {"top1": v["top1"], "top5": v["top5"]}
                             for k, v in s["methods"].items()},
                          "report": str(report / "report.md")}, indent=1))
    return 0


def _groups(args: argparse.Namespace) -> int:
    if args.num_groups < 1:
        raise UsageError(f"--num-groups {args.num_groups}: need at least 1 group",
                         "e.g. --num-groups 4")
    if args.method == "balanced":
        if args.num_classes <= 0:
            raise UsageError("--method balanced needs the number of classes",
                             "add --num-classes N (make groups CLASSES=N), or --shards <train "
                             "shard set> to read it")
        if args.num_groups > args.num_classes:
            raise UsageError(f"--num-groups {args.num_groups} is more than the {args.num_classes} "
                             "classes", "use at most one group per class")
        groups = balanced_groups(args.num_classes, args.num_groups)
    else:
        if not args.confusion:
            raise UsageError("--method confusion needs a confusion matrix",
                             "add --confusion FILE.npy (a [C, C] matrix, rows = true class: the "
                             "confusion.npy of `tstl eval`)")
        confusion = Path(args.confusion)
        if not confusion.is_file():
            raise UsageError(f"--confusion: file not found: {confusion}",
                             "give the confusion.npy that `tstl eval` writes into its report "
                             "folder")
        import numpy as np

        try:
            matrix = np.load(confusion)
        except (ValueError, OSError) as e:
            raise UsageError(f"--confusion {confusion}: not a .npy matrix ({e})",
                             "give the confusion.npy of `tstl eval`") from None
        try:
            groups = confusion_groups(matrix, args.num_groups)
        except ValueError as e:
            raise UsageError(f"--confusion {confusion}: {e}",
                             "give a square [C, C] matrix and K <= C") from None
    save_groups(groups, args.out, args.format)
    load_groups(args.out)  # re-validate what was written
    logger.info("wrote %d groups of %d classes to %s", groups.num_groups, groups.num_classes,
                args.out)
    for g, members in enumerate(groups.groups):
        print(f"group {g}: {list(members)}")
    return 0


def build_parser(prog: str = PROG, names: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """The parser; ``names`` renames sub-commands in usage lines (``tstl`` calls
    ``train`` ``train-tstl``)."""
    names = names or {}

    def sub_prog(cmd: str) -> str:
        return f"{prog} {names.get(cmd, cmd)}"

    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                epilog=exitcodes.EPILOG)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", prog=sub_prog("train"), epilog=exitcodes.EPILOG,
                       help="stage 1 (selector) then stage 2 (experts); resumes a killed run")
    t.add_argument("--config", type=str, nargs="+", required=True,
                   help="YAML files, later ones override earlier")
    t.add_argument("--check", action="store_true",
                   help="validate config, model, shard sets and groups, then exit")
    t.add_argument("--help-config", action=HelpConfig, config_cls=TSTLConfig,
                   help="list every config key (a training run's plus tstl.*) with its type, "
                        "default and doc")
    t.add_argument("overrides", nargs="*",
                   help="dotted overrides, e.g. tstl.num_groups=4 tstl.expert.epochs=5")
    t.set_defaults(fn=_train)
    e = sub.add_parser("eval", prog=sub_prog("eval"), epilog=exitcodes.EPILOG,
                       help="routed multi-view evaluation (hard and soft) next to a single B-CAST")
    e.add_argument("--config", type=str, nargs="+", required=True,
                   help="the YAML files the run was trained with")
    e.add_argument("--selector", type=Path,
                   help="a released selector checkpoint (CAST layout) instead of the run's")
    e.add_argument("--experts", type=Path, nargs="+",
                   help="released expert checkpoints, one per group, in order")
    e.add_argument("--out", type=Path, help="report folder (default <out_dir>/eval)")
    e.add_argument("--help-config", action=HelpConfig, config_cls=TSTLConfig,
                   help="list every config key with its type, default and doc")
    e.add_argument("overrides", nargs="*")
    e.set_defaults(fn=_eval)
    add_launch_args(p, (t, e))
    g = sub.add_parser("groups", prog=sub_prog("groups"), epilog=exitcodes.EPILOG,
                       help="write a class-group file (balanced-contiguous or from a confusion "
                            "matrix)")
    g.add_argument("--method", choices=["balanced", "confusion"], default="balanced")
    g.add_argument("--num-groups", type=int, required=True, help="number of groups K")
    g.add_argument("--num-classes", type=int, default=0,
                   help="classes N (balanced method; or --shards)")
    g.add_argument("--shards", type=Path,
                   help="a shard set folder: its shards.json gives the number of classes")
    g.add_argument("--dataset",
                   help="or a registered dataset: the classes of its training shard set under "
                                     "--data-dir (what `make groups DATASET=...` passes)")
    g.add_argument("--data-dir", type=Path, default=Path("data"),
                   help="with --dataset (default data)")
    g.add_argument("--split", type=int, default=1,
                   help="with --dataset: the official split (UCF101 1-3; default 1)")
    g.add_argument("--confusion",
                   help="[N, N] .npy confusion matrix of a trained B-CAST (confusion method)")
    g.add_argument("--format", choices=["ours", "tstl"], default="ours",
                   help="output format (see docs/tstl.md)")
    g.add_argument("--out", required=True, help="output JSON file")
    g.set_defaults(fn=_groups)
    return p


def main(argv: list[str] | None = None, prog: str = PROG,
         names: dict[str, str] | None = None) -> int:
    """Parse arguments and run the sub-command."""
    args = build_parser(prog, names).parse_args(argv)
    init_logging()
    try:
        if getattr(args, "dataset", None) and args.shards is None and not args.num_classes:
            from tstl.core.datasets import get_dataset

            try:
                ds = get_dataset(args.dataset)
            except ValueError as e:
                raise UsageError(str(e)) from None
            args.shards = args.data_dir / ds.name / "shards" / ds.shard_splits(args.split)[0]
        if getattr(args, "shards", None) is not None and args.method == "balanced":
            args.num_classes = _classes_of(args.shards, args.num_classes)
        # any other failure: one error line, the traceback to the run's log
        return run_command(args.fn, args, (ConfigError, GroupFileError, UsageError))
    except (ConfigError, GroupFileError, UsageError) as err:
        return exitcodes.usage_error(err)


def _classes_of(shard_dir: Path, given: int) -> int:
    """The number of classes of a shard set (``--shards``); must agree with ``--num-classes`` when
    both are given."""
    from tstl.core import shards

    try:
        n = len(shards.load(shard_dir).classes)
    except FileNotFoundError:
        raise UsageError(f"--shards: no shard set at {shard_dir}",
                         "give a folder with a shards.json, e.g. "
                         "data/ucf101/shards/train_split1 (make shards DATASET=...)") from None
    if given and given != n:
        raise UsageError(f"--num-classes {given} but {shard_dir} has {n} classes",
                         "give one of them")
    return n


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
