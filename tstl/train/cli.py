"""``python -m tstl.train.cli {train,eval,report}``: thin entry points over ``Trainer`` and ``evaluate``.

Launch training through DeepSpeed (``make train``) or plainly for one process. Configs are YAML files layered in
order, then ``key.sub=value`` overrides; unknown keys and bad values are rejected with the file and key named.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tstl.core.config import ConfigError, load_cli_config
from tstl.core.log import init_logging
from tstl.train import dist
from tstl.train.config import TrainConfig
from tstl.train.evaluate import evaluate_checkpoint
from tstl.train.preemption import EXIT_PREEMPTED, Preempted
from tstl.train.report import write_report
from tstl.train.trainer import Trainer

logger = logging.getLogger("tstl.train")


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_cli_config(TrainConfig, args.config, args.overrides)
    trainer = Trainer(cfg)
    try:
        result = trainer.train()
    except Preempted as e:  # saved on SIGTERM/SIGUSR1: resumable, not finished (docs/training.md, issue 13)
        logger.warning("%s", e)
        return EXIT_PREEMPTED
    finally:
        trainer.close()
    if result is not None and dist.is_main():
        write_report(Path(cfg.out_dir))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    res, out = evaluate_checkpoint(args.checkpoint, args.config or (), args.overrides, args.out)
    if dist.is_main():
        print(json.dumps({**res.summary(), "report": str(out)}, indent=1))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    print(write_report(args.run_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tstl.train.cli", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (resumes automatically from <out_dir>/checkpoints)")
    # type=str: key=value words among the files are overrides, and Path would turn data_dir=http://h into http:/h
    t.add_argument("--config", type=str, nargs="+", required=True, help="YAML files, later ones override earlier")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=5e-4 data.batch_size=4")
    t.set_defaults(fn=cmd_train)
    e = sub.add_parser("eval", help="multi-view evaluation of any checkpoint load_checkpoint accepts")
    e.add_argument("--checkpoint", type=Path, required=True, help="checkpoint file, DeepSpeed tag folder or run folder")
    e.add_argument("--config", type=str, nargs="*", help="YAML files (default: the run's config.yaml)")
    e.add_argument("--out", type=Path, help="report folder (default <out_dir>/eval-<name>)")
    e.add_argument("overrides", nargs="*")
    e.set_defaults(fn=cmd_eval)
    for launched in (p, t, e):  # the deepspeed launcher passes --local_rank=N; we read LOCAL_RANK from the env
        launched.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    r = sub.add_parser("report", help="write <run>/report.md with accuracy and plots")
    r.add_argument("run_dir", type=Path)
    r.set_defaults(fn=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    init_logging()
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError) as e:
        logger.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
