"""``tstl``: the one command of the project; every sub-command is one of the tools' command lines.

``tstl <command> --help`` shows a command's arguments. The sub-command modules are imported only
when their command runs, so ``tstl --help`` and ``tstl --version`` are instant; each tool's usage
line names the ``tstl`` command (``usage: tstl shards build ...``) and ``python -m <module>`` still
works with its own name. Exit codes follow ``tstl.core.exitcodes`` (0 ok, 1 run failed, 2
usage/config/input error, 3 environment, 4 locked, 75 preempted).
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from tstl import __version__
from tstl.core import exitcodes

PROG = "tstl"


@dataclass(frozen=True)
class Command:
    """A ``tstl`` sub-command: ``module.main(prefix + rest, prog=..., **kwargs)``."""

    module: str
    help: str
    prefix: tuple[str, ...] = ()
    """Words put before the user's arguments (the tool's own sub-command name)."""
    prog: str = PROG
    """The prog handed to the tool's parser (its usage line then reads
    ``usage: <prog> <sub-command> ...``)."""
    kwargs: dict = field(default_factory=dict)
    section: str = ""


def _commands() -> dict[str, Command]:
    from tstl.core.datasets import DATASETS  # standard library only: cheap

    prep = "prepare"
    cmds = {f"prepare-{d.name}": Command("pipeline.cli", f"{d.title}: raw release -> H.264 .mp4 "
                                         "+ CSVs + manifest", (f"prepare-{d.name}",), section=prep)
            for d in DATASETS.values()}
    cmds["prepare"] = Command("pipeline.cli", "any registered dataset: prepare --dataset NAME",
                              ("prepare",), section=prep)
    cmds["finalize"] = Command("pipeline.cli",
                               "after --part runs: merge manifests, write the annotation CSVs",
                               ("finalize",), section=prep)
    cmds["synthetic"] = Command("pipeline.synthetic",
                                "write small synthetic SSV2/UCF101/Kinetics-style raw datasets",
                                prog=f"{PROG} synthetic", section=prep)
    cmds["shards"] = Command("shard_tools.cli",
                             "WebDataset shard sets: build, verify, ls, inspect, stats, subset",
                             prog=f"{PROG} shards", section="shards")
    train = "train"
    cmds["train"] = Command("tstl.train.cli",
                            "train a model with DeepSpeed (resumes); --check validates and exits",
                            ("train",), section=train)
    cmds["eval"] = Command("tstl.train.cli", "multi-view evaluation of a checkpoint or run folder",
                           ("eval",), section=train)
    cmds["report"] = Command("tstl.train.cli", "write <run>/report.md with accuracy and plots",
                             ("report",), section=train)
    cmds["print-config"] = Command("tstl.train.recipes",
                                   "the resolved recipe of a (dataset, model) as YAML",
                                   prog=f"{PROG} print-config", section=train)
    cmds["config"] = Command("tstl.cli",
                             "config keys [--tstl]: every config key with type, default and doc",
                             prog=f"{PROG} config", section=train)
    tstl = "TSTL"
    names = {"train": "train-tstl", "eval": "eval-tstl"}
    cmds["groups"] = Command("tstl.twostage.cli",
                             "TSTL class groups (balanced or from a confusion matrix)",
                             ("groups",), kwargs={"names": names}, section=tstl)
    cmds["train-tstl"] = Command("tstl.twostage.cli",
                                 "TSTL: stage-1 selector + stage-2 experts (resumes)",
                                 ("train",), kwargs={"names": names}, section=tstl)
    cmds["eval-tstl"] = Command("tstl.twostage.cli",
                                "TSTL routed multi-view evaluation, hard and soft routing",
                                ("eval",), kwargs={"names": names}, section=tstl)
    use = "use a trained model"
    cmds["predict"] = Command("tstl.predict.cli", "top-k classes of video files, folders or shard "
                              "sets (eval's views)", ("predict",), section=use)
    cmds["export"] = Command("tstl.predict.cli", "ONNX file of a run's classifier + JSON sidecar",
                             ("export",), section=use)
    return cmds


def help_text(cmds: dict[str, Command]) -> str:
    width = max(map(len, cmds)) + 2
    lines = [f"usage: {PROG} [-h] [--version] <command> [args ...]", "",
             "Video action recognition on sharded datasets: prepare, shard, train, evaluate, TSTL.",
             ""]
    section = None
    for name, c in cmds.items():
        if c.section != section:
            section = c.section
            lines.append(f"{section} commands:")
        lines.append(f"  {name:<{width}}{c.help}")
    lines += ["", (f"`{PROG} <command> --help` shows a command's arguments; docs/ and README.md "
                   "'Command line' describe the workflow."), exitcodes.EPILOG]
    return "\n".join(lines)


def config_main(argv: Sequence[str] | None = None, prog: str = f"{PROG} config") -> int:
    """``tstl config keys [--tstl]``: every config key of a training (or TSTL) run."""
    import argparse

    p = argparse.ArgumentParser(prog=prog, description="Configuration reference.",
                                epilog=exitcodes.EPILOG)
    sub = p.add_subparsers(dest="what", required=True)
    k = sub.add_parser("keys", help="every key with its type, default and docstring (what "
                                    "key.sub=value accepts)")
    k.add_argument("--tstl", action="store_true",
                   help="the keys of a TSTL run (a training run's plus tstl.*)")
    args = p.parse_args(argv)
    from tstl.core.config import format_keys

    if args.tstl:
        from tstl.twostage.config import TSTLConfig as cls
    else:
        from tstl.train.config import TrainConfig as cls
    print(format_keys(cls))
    return exitcodes.OK


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmds = _commands()
    if not argv:
        print(help_text(cmds), file=sys.stderr)
        return exitcodes.USAGE
    first, rest = argv[0], argv[1:]
    if first in ("-h", "--help", "help"):
        if first == "help" and rest:  # `tstl help train` = `tstl train --help`
            return main([rest[0], "--help"])
        print(help_text(cmds))
        return exitcodes.OK
    if first in ("-V", "--version"):
        print(f"{PROG} {__version__}")
        return exitcodes.OK
    cmd = cmds.get(first)
    if cmd is None:
        close = difflib.get_close_matches(first, cmds, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return exitcodes.usage_error(f"unknown command '{first}' ({hint}`{PROG} --help` lists the "
                                     f"commands: {', '.join(cmds)})")
    # (also when run as python -m tstl.cli, where __name__ is __main__)
    if cmd.module == "tstl.cli":
        return config_main(rest, prog=cmd.prog)
    module = importlib.import_module(cmd.module)
    return module.main([*cmd.prefix, *rest], prog=cmd.prog, **cmd.kwargs)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
