"""``tstl {train,eval,report}`` (also ``python -m tstl.train.cli``): thin entry points over
``Trainer`` and ``evaluate``.

Launch training through DeepSpeed (``make train``) or plainly for one process. Configs are YAML
files layered in order, then ``key.sub=value`` overrides; unknown keys and bad values are rejected
with the file and key named. ``train --check`` validates the config, the model and the shard sets
and exits (what ``make train`` runs before it starts the launcher); ``--help-config`` lists
every key.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tstl.core import exitcodes
from tstl.core.config import ConfigError, format_keys, load_cli_config
from tstl.core.exitcodes import UsageError
from tstl.train import runlog
from tstl.train.config import TrainConfig

logger = logging.getLogger("tstl.train")

PROG = "python -m tstl.train.cli"


def _load(words: list[Path] | None, overrides: list[str]) -> TrainConfig:
    from tstl.train.preflight import check_config_files

    check_config_files(words or [])
    return load_cli_config(TrainConfig, words or [], overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from tstl.train.preflight import check_run

    cfg = _load(args.config, args.overrides)
    check_run(cfg, train=True)
    if args.check:
        print(f"ok: {cfg.dataset} {cfg.model.name}: config, model and shard sets "
              f"({cfg.shard_dir(cfg.train_split)}) are ready; out_dir {cfg.out_dir}")
        return exitcodes.OK
    # heavy imports only once the config is known good (`tstl train --help` and `--check` stay fast)
    from tstl.train import dist
    from tstl.train.preemption import Preempted, handle_signals
    from tstl.train.report import write_report
    from tstl.train.trainer import Trainer

    runlog.attach(Path(cfg.out_dir), "train")
    with handle_signals():  # from here to the exit a signal ends the run resumable (docs/training)
        trainer = None
        try:
            trainer = Trainer(cfg)
            result = trainer.train()
        except Preempted as e:  # saved on SIGTERM/SIGUSR1: resumable, not finished (issue 13)
            logger.warning("%s", e)
            return exitcodes.PREEMPTED
        finally:
            if trainer is not None:
                trainer.close()
        if result is not None and dist.is_main():
            write_report(Path(cfg.out_dir))  # a signal now changes nothing: the run is finished
    return exitcodes.OK


def cmd_eval(args: argparse.Namespace) -> int:
    from tstl.train.checkpoint import resolve_weights
    from tstl.train.preflight import check_model, check_run

    try:
        _, run_cfg = resolve_weights(args.checkpoint)
    except FileNotFoundError as e:
        raise UsageError(str(e),
                         "give a checkpoint file, a DeepSpeed tag folder or a run folder") from None
    # the same config evaluate_checkpoint resolves: --config, else the run's config.yaml, else
    # defaults + overrides
    cfg = _load(list(args.config or []) or ([run_cfg] if run_cfg else []), args.overrides)
    check_run(cfg, train=False, model=False)
    check_model(cfg.model, cfg.model.num_classes)
    from tstl.train import dist
    from tstl.train.evaluate import evaluate_checkpoint

    weights, _ = resolve_weights(args.checkpoint)
    report = args.out or Path(cfg.out_dir) / f"eval-{weights.parent.name}"
    runlog.attach(report, "eval")  # into the report folder
    res, out = evaluate_checkpoint(args.checkpoint, args.config or (), args.overrides, args.out,
                                   args.dump)
    if dist.is_main():
        dump = {"dump": str(out / "views.parquet")} if args.dump else {}
        print(json.dumps({**res.summary(), "report": str(out), **dump}, indent=1))
    return exitcodes.OK


def cmd_report(args: argparse.Namespace) -> int:
    if not args.run_dir.is_dir():
        raise UsageError(f"run folder not found: {args.run_dir}",
                         "give the out_dir of a training run")
    from tstl.train.report import write_report

    print(write_report(args.run_dir))
    return exitcodes.OK


class HelpConfig(argparse.Action):
    """``--help-config``: print every config key (type, default, doc) and exit 0."""

    def __init__(self, option_strings, dest, config_cls=TrainConfig, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.config_cls = config_cls

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(format_keys(self.config_cls))
        parser.exit()


def add_launch_args(parser: argparse.ArgumentParser,
                    commands: tuple[argparse.ArgumentParser, ...]) -> None:
    """What every launched command takes: ``--local_rank`` (the DeepSpeed launcher passes it; we
    read ``LOCAL_RANK`` from the environment) and ``--debug``."""
    for launched in (parser, *commands):
        launched.add_argument("--local_rank", "--local-rank", type=int, default=None,
                              help=argparse.SUPPRESS)
    for cmd in commands:
        cmd.add_argument("--debug", action="store_true",
                         help="print the traceback of a failure on the terminal too (it always "
                              "goes to <run folder>/logs/<command>-rank<r>.log)")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].replace("``", "'"),
                                epilog=exitcodes.EPILOG)
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,eval,report}")
    t = sub.add_parser("train", help="train (resumes automatically from <out_dir>/checkpoints)",
                       description="Train a model; a rerun with the same out_dir resumes. Config "
                                   "files are layered in order, then key.sub=value overrides (tstl "
                                   "config keys lists them).",
                       epilog=exitcodes.EPILOG)
    # type=str: key=value words among the files are overrides, and Path would turn data_dir=http://h
    # into http:/h
    t.add_argument("--config", type=str, nargs="+", required=True,
                   help="YAML files, later ones override earlier (configs/data/<dataset>.yaml "
                        "configs/model/<model>.yaml ...; tstl print-config shows a recipe)")
    t.add_argument("--check", action="store_true",
                   help="validate config, model and shard sets, then exit (0: ready)")
    t.add_argument("--help-config", action=HelpConfig,
                   help="list every config key with its type, default and doc")
    t.add_argument("overrides", nargs="*",
                   help="dotted overrides, e.g. optim.lr=5e-4 data.batch_size=4")
    t.set_defaults(fn=cmd_train)
    e = sub.add_parser("eval",
                       help="multi-view evaluation of any checkpoint load_checkpoint accepts",
                       epilog=exitcodes.EPILOG)
    e.add_argument("--checkpoint", type=Path, required=True,
                   help="checkpoint file, DeepSpeed tag folder or run folder")
    e.add_argument("--config", type=str, nargs="*",
                   help="YAML files (default: the run's config.yaml)")
    e.add_argument("--out", type=Path, help="report folder (default <out_dir>/eval-<name>)")
    e.add_argument("--dump", action="store_true", help="also write <report folder>/views.parquet: "
                   "per video its label, the logits of every view and the merged probabilities "
                   "(docs/training.md)")
    e.add_argument("--help-config", action=HelpConfig,
                   help="list every config key with its type, default and doc")
    e.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.test_views=[1,1]")
    e.set_defaults(fn=cmd_eval)
    add_launch_args(p, (t, e))
    r = sub.add_parser("report", help="write <run>/report.md with accuracy and plots",
                       epilog=exitcodes.EPILOG)
    r.add_argument("run_dir", type=Path, help="the out_dir of a training run")
    r.set_defaults(fn=cmd_report)
    return p


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    from tstl.core.log import init_logging

    args = build_parser(prog).parse_args(argv)
    init_logging()
    return run_command(args.fn, args)


def run_command(fn, args: argparse.Namespace,
                usage: tuple[type[Exception], ...] = (ConfigError, UsageError)) -> int:
    """``fn(args)`` with every failure turned into one ``error: <cause> (<fix>)`` line and its exit
    code (issue 21; the traceback goes to the run's log file, ``tstl.train.runlog``); ``usage``
    errors exit 2 with their message."""
    try:
        return fn(args)
    except usage as e:
        return exitcodes.usage_error(e)
    except KeyboardInterrupt:
        print("error: interrupted (rerun the same command to resume from the last checkpoint)",
              file=sys.stderr)
        return 130
    except Exception as e:
        return runlog.fail(e, debug=getattr(args, "debug", False))
    finally:
        runlog.detach()


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
