"""Training recipes: one resolved ``TrainConfig`` per (dataset, model), layered from YAML files.

A recipe is ``configs/data/<dataset>.yaml`` <- ``configs/model/<model>.yaml`` <-
``configs/recipe/<model>-<dataset>.yaml`` (the last only where the pair needs its own settings) <-
command-line overrides. ``make print-config`` prints the result exactly as the run's ``config.yaml``
will hold it::

    tstl print-config ssv2 bcast_vit_b16 [key.sub=value ...]
    python -m tstl.train.recipes --dataset ssv2 --model bcast_vit_b16 [key.sub=value ...]

The configs ship inside the package (``tstl/configs`` is a link to the checkout's ``configs/`` that
the wheel build copies), so an installed ``tstl`` finds its recipes outside the checkout;
``CONFIG_DIR`` is the checkout's folder when there is one, else the packaged copy (read
through ``importlib.resources``).
"""

from __future__ import annotations

import argparse
import importlib.resources
import sys
from collections.abc import Sequence
from pathlib import Path

from tstl.core.config import ConfigError, dump_yaml, load_config
from tstl.core.exitcodes import EPILOG, OK, usage_error
from tstl.train.config import TrainConfig

CHECKOUT_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def packaged_configs() -> Path:
    """The configs inside the installed package (``tstl/configs``)."""
    return Path(str(importlib.resources.files("tstl") / "configs"))


CONFIG_DIR = CHECKOUT_CONFIGS if CHECKOUT_CONFIGS.is_dir() else packaged_configs()

__all__ = ["CONFIG_DIR", "available", "load_recipe", "packaged_configs", "print_config",
           "recipe_files"]


def available(config_dir: Path = CONFIG_DIR) -> tuple[list[str], list[str]]:
    """The datasets (``configs/data/*.yaml``) and models (``configs/model/*.yaml``) that have
    a config."""
    return (sorted(p.stem for p in (config_dir / "data").glob("*.yaml")),
            sorted(p.stem for p in (config_dir / "model").glob("*.yaml")))


def recipe_files(dataset: str, model: str, config_dir: Path = CONFIG_DIR) -> list[Path]:
    """The layers of the (``dataset``, ``model``) recipe in order: data, model, and the pair layer
    when it exists."""
    data, mod = config_dir / "data" / f"{dataset}.yaml", config_dir / "model" / f"{model}.yaml"
    datasets, models = available(config_dir)
    if not data.is_file():
        raise ConfigError(f"{data}: no data config for dataset '{dataset}'; available datasets: "
                          f"{', '.join(datasets) or '(none)'} (add configs/data/{dataset}.yaml)")
    if not mod.is_file():
        raise ConfigError(f"{mod}: no model config for model '{model}'; available models: "
                          f"{', '.join(models) or '(none)'} (add configs/model/{model}.yaml)")
    pair = config_dir / "recipe" / f"{model}-{dataset}.yaml"
    return [data, mod] + ([pair] if pair.is_file() else [])


def load_recipe(dataset: str, model: str, overrides: Sequence[str] = (),
                config_dir: Path = CONFIG_DIR) -> TrainConfig:
    """The resolved ``TrainConfig`` of a recipe with dotted ``overrides`` (``["optim.lr=3e-4"]``)
    applied last."""
    return load_config(TrainConfig, recipe_files(dataset, model, config_dir), overrides)


def print_config(dataset: str, model: str, overrides: Sequence[str] = (),
                 config_dir: Path = CONFIG_DIR, file=None) -> str:
    """Write the resolved recipe as YAML (what the run's ``config.yaml`` holds) to ``file``
    (stdout); return it."""
    text = dump_yaml(load_recipe(dataset, model, overrides, config_dir))
    (file or sys.stdout).write(text)
    return text


def build_parser(prog: str = "python -m tstl.train.recipes") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Print the resolved training recipe of a (dataset, model) as YAML, "
                               "exactly as the run's config.yaml will hold it.", epilog=EPILOG)
    p.add_argument("words", nargs="*", metavar="[DATASET [MODEL]] [key.sub=value ...]",
                   help="dataset and model (or --dataset/--model), then dotted overrides")
    p.add_argument("--dataset", help="a configs/data/<dataset>.yaml")
    p.add_argument("--model", help="a configs/model/<model>.yaml (default bcast_vit_b16)")
    p.add_argument("--config-dir", type=Path, default=None,
                   help=f"recipe folder (default {CONFIG_DIR})")
    p.add_argument("--list", action="store_true",
                   help="list the datasets and models that have a config, and exit")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m tstl.train.recipes") -> int:
    p = build_parser(prog)
    args = p.parse_args(argv)
    config_dir = args.config_dir or CONFIG_DIR
    if args.list:
        datasets, models = available(config_dir)
        print(f"datasets: {', '.join(datasets)}\nmodels: {', '.join(models)}\n(configs in "
              f"{config_dir})")
        return OK
    names = [w for w in args.words if "=" not in w]
    overrides = [w for w in args.words if "=" in w]
    if len(names) > 2 or (names and args.dataset) or (len(names) > 1 and args.model):
        p.error("give the dataset and model once, as words or as --dataset/--model (got "
                f"{' '.join(names)})")
    dataset = args.dataset or (names[0] if names else None)
    model = args.model or (names[1] if len(names) > 1 else "bcast_vit_b16")
    if not dataset:
        datasets, _ = available(config_dir)
        p.error(f"name a dataset: one of {', '.join(datasets)} (e.g. print-config ucf101 "
                "bcast_vit_b16)")
    try:
        print_config(dataset, model, overrides, config_dir)
    except ConfigError as e:
        return usage_error(e)
    return OK


if __name__ == "__main__":
    sys.exit(main())
