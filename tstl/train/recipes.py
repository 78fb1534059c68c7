"""Training recipes: one resolved ``TrainConfig`` per (dataset, model), layered from YAML files.

A recipe is ``configs/data/<dataset>.yaml`` <- ``configs/model/<model>.yaml`` <- ``configs/recipe/<model>-<dataset>.yaml``
(the last only where the pair needs its own settings) <- command-line overrides. ``make print-config`` prints the
result exactly as the run's ``config.yaml`` will hold it::

    python -m tstl.train.recipes --dataset ssv2 --model bcast_vit_b16 [key.sub=value ...]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tstl.core.config import ConfigError, dump_yaml, load_config
from tstl.train.config import TrainConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

__all__ = ["CONFIG_DIR", "available", "load_recipe", "print_config", "recipe_files"]


def available(config_dir: Path = CONFIG_DIR) -> tuple[list[str], list[str]]:
    """The datasets (``configs/data/*.yaml``) and models (``configs/model/*.yaml``) that have a config."""
    return (sorted(p.stem for p in (config_dir / "data").glob("*.yaml")),
            sorted(p.stem for p in (config_dir / "model").glob("*.yaml")))


def recipe_files(dataset: str, model: str, config_dir: Path = CONFIG_DIR) -> list[Path]:
    """The layers of the (``dataset``, ``model``) recipe in order: data, model, and the pair layer when it exists."""
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


def load_recipe(dataset: str, model: str, overrides: Sequence[str] = (), config_dir: Path = CONFIG_DIR) -> TrainConfig:
    """The resolved ``TrainConfig`` of a recipe with dotted ``overrides`` (``["optim.lr=3e-4"]``) applied last."""
    return load_config(TrainConfig, recipe_files(dataset, model, config_dir), overrides)


def print_config(dataset: str, model: str, overrides: Sequence[str] = (), config_dir: Path = CONFIG_DIR,
                 file=None) -> str:
    """Write the resolved recipe as YAML (what the run's ``config.yaml`` holds) to ``file`` (stdout); return it."""
    text = dump_yaml(load_recipe(dataset, model, overrides, config_dir))
    (file or sys.stdout).write(text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tstl.train.recipes", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="a configs/data/<dataset>.yaml")
    p.add_argument("--model", default="bcast_vit_b16", help="a configs/model/<model>.yaml")
    p.add_argument("--config-dir", type=Path, default=CONFIG_DIR)
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = p.parse_args(argv)
    try:
        print_config(args.dataset, args.model, args.overrides, args.config_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
