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

logger = logging.getLogger("tstl.train")


def _config(files: list[Path], overrides: list[str]):
    from tstl.train.config import TrainConfig

    return load_cli_config(TrainConfig, files, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from tstl.train.preemption import EXIT_PREEMPTED, Preempted
    from tstl.train.report import write_report
    from tstl.train.trainer import Trainer

    cfg = _config(args.config, args.overrides)
    trainer = Trainer(cfg)
    try:
        result = trainer.train()
    except Preempted as e:  # saved on SIGTERM/SIGUSR1: resumable, not finished (docs/training.md, issue 13)
        logger.warning("%s", e)
        return EXIT_PREEMPTED
    finally:
        trainer.close()
    from tstl.train import dist

    if result is not None and dist.is_main():
        write_report(Path(cfg.out_dir))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from tstl.data import build_eval_loader
    from tstl.train import dist
    from tstl.train.evaluate import evaluate, save_report
    from tstl.train.trainer import DTYPES, build_model, shard_dir

    from tstl.train.checkpoint import resolve_weights

    weights, run_cfg = resolve_weights(args.checkpoint)
    files = args.config or ([run_cfg] if run_cfg else [])
    cfg = _config(files, args.overrides)
    device = dist.init()
    loader = build_eval_loader(cfg.data, shard_dir(cfg, cfg.val_split), rank=dist.rank(), world_size=dist.world())
    num_classes = cfg.model.num_classes or loader.num_classes
    model, _ = build_model(cfg.model, num_classes)
    from tstl.models import load_checkpoint

    report = load_checkpoint(model, weights)
    logger.info("evaluating %s (%s) on %s", weights, report.format, shard_dir(cfg, cfg.val_split))
    dtype = DTYPES[cfg.engine.precision] if device.type == "cuda" else torch.float32
    res = evaluate(model.to(device, dtype), loader, device, num_classes, dtype)
    out = args.out or Path(cfg.out_dir) / f"eval-{weights.parent.name}"
    if dist.is_main():
        save_report(res, out, loader.classes)
        print(json.dumps({**res.summary(), "report": str(out)}, indent=1))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tstl.train.report import write_report

    print(write_report(args.run_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tstl.train.cli", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (resumes automatically from <out_dir>/checkpoints)")
    t.add_argument("--config", type=Path, nargs="+", required=True, help="YAML files, later ones override earlier")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=5e-4 data.batch_size=4")
    t.set_defaults(fn=cmd_train)
    e = sub.add_parser("eval", help="multi-view evaluation of any checkpoint load_checkpoint accepts")
    e.add_argument("--checkpoint", type=Path, required=True, help="checkpoint file, DeepSpeed tag folder or run folder")
    e.add_argument("--config", type=Path, nargs="*", help="YAML files (default: the run's config.yaml)")
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
