"""A trained run as ``tstl predict`` and ``tstl export`` use it: the model(s), the run's data
settings, its class names and how raw files are normalised for it.

Two kinds of run: a single classifier (B-CAST, TimeSformer; a run folder, a DeepSpeed tag folder or
a checkpoint file, resolved as ``tstl eval`` resolves them) and a TSTL run (a folder with
``groups.json`` and ``selector/selector.pt``: the selector routes every view to its experts,
``tstl.twostage.routing``).
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tstl.core.config import ConfigError, load_cli_config
from tstl.core.exitcodes import UsageError
from tstl.data.config import DataConfig
from tstl.predict.inputs import PrepareRule
from tstl.train.build import build_model, compute_dtype
from tstl.train.checkpoint import resolve_weights
from tstl.train.config import TrainConfig

logger = logging.getLogger(__name__)

ROUTINGS = ("hard", "soft")
RUN_FIX = "give a run folder, a DeepSpeed tag folder, a checkpoint file or a TSTL run folder"


class Classifier:
    """Scores views with one classifier: per-view logits, merged by the run's ``test_merge``."""

    def __init__(self, model: nn.Module, merge_rule: str) -> None:
        self.model, self.merge_rule = model.eval(), merge_rule

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> np.ndarray:
        out = self.model(x)
        if not isinstance(out, torch.Tensor):  # e.g. a verb/noun model's dict of heads
            raise UsageError(f"the model returns a {type(out).__name__}, not one logits tensor: "
                             "predict handles single-head classifiers",
                             "use tstl eval, or tstl export (one ONNX output per head)")
        return out.float().cpu().numpy()


class Routed:
    """Scores views with TSTL: the selector picks group(s), their experts classify
    (``routing.route``); per-view probabilities over every class, merged by their mean (as
    ``tstl eval-tstl``)."""

    merge_rule = "mean"

    def __init__(self, models, top_k: int) -> None:
        self.models, self.top_k = models, top_k
        for m in (models.selector, *models.experts):
            m.eval()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> np.ndarray:
        from tstl.twostage.routing import route

        m = self.models
        out = route(x, m.selector(x).float(), m.experts, m.groups, top_k=self.top_k)
        return out.probs.cpu().numpy()


@dataclass
class LoadedRun:
    """Everything a prediction needs from a run."""

    scorer: Classifier | Routed
    config: TrainConfig
    """The run's config (a TSTL run: its selector stage's, whose data settings are the run's)."""
    classes: list[str]
    device: torch.device
    dtype: torch.dtype
    prepare: PrepareRule
    description: str
    tstl: bool = False

    @property
    def data(self) -> DataConfig:
        return self.config.data


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the first GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device here", "use --device cpu")
    return device


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The run's ``engine.precision`` (what ``tstl eval`` uses); an fp16 run on the CPU runs in
    fp32."""
    try:
        return compute_dtype(precision, device)
    except ConfigError:
        logger.warning("engine.precision=fp16 has no CPU kernels: predicting in fp32")
        return torch.float32


def prepare_rule(cfg: TrainConfig, as_is: bool = False) -> PrepareRule:
    """How raw files are normalised for this run: as the prepare stage transcoded its dataset.

    The size comes from the prepared dataset's ``manifest.parquet`` (the parameters every video
    was transcoded with, so a ``--short-side`` choice is kept) when ``<data_dir>/<dataset>`` is
    here, else from the dataset registry's default (``tstl/core/datasets``: 240 px high, Kinetics
    short side 320).
    """
    if as_is:
        return PrepareRule(as_is=True)
    manifest = Path(cfg.data_dir) / cfg.dataset / "manifest.parquet"
    if not cfg.data_dir.startswith(("http://", "https://")) and manifest.is_file():
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(manifest, columns=["status", "params"]).to_pylist()
            used = Counter(r["params"] for r in rows if r["status"] == "ok" and r["params"])
            if used:
                params = json.loads(used.most_common(1)[0][0])
                return PrepareRule(height=params.get("height"), short_side=params.get("short_side"))
        except (OSError, ValueError, KeyError) as e:
            logger.warning("%s: cannot read the transcode parameters (%s); using the dataset's "
                           "default", manifest, e)
    from tstl.core.datasets import get_dataset

    try:
        ds = get_dataset(cfg.dataset)
    except ValueError:
        logger.warning("dataset %r is not registered: raw files are transcoded to 240 px high",
                       cfg.dataset)
        return PrepareRule(height=240)
    height = ds.height if ds.short_side is None else None
    return PrepareRule(height=height, short_side=ds.short_side)


def _shard_classes(cfg: TrainConfig) -> list[str] | None:
    """Class names of the run's training (else validation) shard set, when it is readable here."""
    from tstl.core.shards import INDEX, read_index

    for split in (cfg.train_split, cfg.val_split):
        try:
            classes = read_index(f"{cfg.shard_dir(split)}/{INDEX}").classes
        except Exception:  # not here (another machine, no data): the next source is tried
            continue
        if classes:
            return list(classes)
    return None


def _report_classes(csv_path: Path) -> list[str] | None:
    """Class names from an evaluation report's ``per_class.csv`` (``label,class,...``)."""
    try:
        with open(csv_path, newline="") as f:
            rows = sorted((int(r["label"]), r["class"]) for r in csv.DictReader(f))
    except (OSError, KeyError, ValueError):
        return None
    if not rows or [i for i, _ in rows] != list(range(len(rows))):
        return None
    return [name for _, name in rows]


def read_classes_file(path: str | Path) -> list[str]:
    """One class name per line (``classes.txt`` of a prepared dataset: line ``i`` names label
    ``i``)."""
    fix = "give a text file with one class name per line"
    try:
        names = [line.rstrip("\n") for line in Path(path).read_text().splitlines()]
    except OSError as e:
        raise UsageError(f"--classes {path}: {e.strerror or e}", fix) from None
    while names and not names[-1].strip():
        names.pop()
    if not names:
        raise UsageError(f"--classes {path}: empty", fix)
    return names


def class_names(cfg: TrainConfig, num_classes: int, reports: Sequence[Path],
                classes_file: str | Path | None) -> list[str]:
    """The run's class names: ``classes_file``, else its shard sets' ``shards.json``, else its
    evaluation report's ``per_class.csv``; ``class_<i>`` (with a warning) when none is here."""
    if classes_file:
        names = read_classes_file(classes_file)
        if len(names) != num_classes:
            raise UsageError(f"--classes {classes_file}: {len(names)} names for a model of "
                             f"{num_classes} classes",
                             "give the classes.txt of the dataset the run was trained on")
        return names
    for names in [_shard_classes(cfg), *(_report_classes(p) for p in reports)]:
        if names and len(names) == num_classes:
            return names
    logger.warning("no class names found (the run's shard sets are not here and it has no "
                   "report): naming them class_<i>; give --classes "
                   "<dataset>/annotations/classes.txt")
    return [f"class_{i}" for i in range(num_classes)]


def _head_rows(weights: Path, trusted: Sequence[str]) -> int | None:
    from tstl.models.checkpoint import read_checkpoint

    sd = read_checkpoint(weights, trusted=list(trusted) or False)
    heads = [v for k, v in sd.items() if k.removeprefix("module.") == "head.weight"]
    return int(heads[0].shape[0]) if heads else None


def is_tstl_run(path: Path) -> bool:
    return path.is_dir() and (path / "groups.json").is_file() and (path / "selector").is_dir()


def _config(files: Sequence[str | Path], overrides: Sequence[str], what: str) -> TrainConfig:
    if not files:
        raise UsageError(f"{what}: no run config.yaml for this checkpoint (a file outside a run "
                         "folder)",
                         "give --config with the run's config.yaml (or its recipe files)")
    return load_cli_config(TrainConfig, [str(f) for f in files], overrides)


def load(checkpoint: str | Path, *, configs: Sequence[str | Path] = (),
         overrides: Sequence[str] = (), device: str = "auto", routing: str = "hard",
         soft_top_k: int = 2, classes_file: str | Path | None = None,
         as_is: bool = False) -> LoadedRun:
    """Load a run (or checkpoint) for prediction; ``configs``/``overrides`` as ``tstl eval``."""
    if routing not in ROUTINGS:
        raise UsageError(f"--routing {routing!r}", f"use one of {', '.join(ROUTINGS)}")
    path = Path(checkpoint)
    dev = pick_device(device)
    if is_tstl_run(path):
        return _load_tstl(path, configs, overrides, dev, routing, soft_top_k, classes_file, as_is)
    try:
        weights, run_cfg = resolve_weights(path)
    except FileNotFoundError as e:
        raise UsageError(str(e), RUN_FIX) from None
    cfg = _config(list(configs) or ([run_cfg] if run_cfg else []), overrides, str(path))
    run_dir = run_cfg.parent if run_cfg else None
    num_classes = (cfg.model.num_classes or len(_shard_classes(cfg) or [])
                   or _head_rows(weights, cfg.model.trusted_checkpoints))
    if not num_classes:
        raise UsageError(f"{weights}: cannot tell the number of classes (no model.num_classes, no "
                         "shards.json, no head.weight)", "set model.num_classes=N with --set")
    reports = [run_dir / "test" / "per_class.csv"] if run_dir else []
    classes = class_names(cfg, num_classes, reports, classes_file)
    from tstl.models import load_checkpoint

    model, _ = build_model(replace(cfg.model, init=[]), num_classes)
    load_checkpoint(model, weights, trusted=list(cfg.model.trusted_checkpoints))
    dtype = pick_dtype(cfg.engine.precision, dev)
    model.to(dev, dtype)
    return LoadedRun(Classifier(model, cfg.test_merge), cfg, classes, dev, dtype,
                     prepare_rule(cfg, as_is), f"{cfg.model.name} from {weights}")


def _load_tstl(run: Path, configs: Sequence[str | Path], overrides: Sequence[str],
               dev: torch.device, routing: str, soft_top_k: int,
               classes_file: str | Path | None, as_is: bool) -> LoadedRun:
    from tstl.twostage.evaluate import load_run
    from tstl.twostage.groups import load_groups

    selector_cfg = run / "selector" / "config.yaml"
    default = [selector_cfg] if selector_cfg.is_file() else []
    cfg = _config(list(configs) or default, overrides, str(run))
    groups = load_groups(run / "groups.json")
    try:
        models = load_run(run, groups)
    except FileNotFoundError as e:
        raise UsageError(str(e), "finish the TSTL run first (make train-tstl)") from None
    report = run / "eval" / "hard" / "per_class.csv"
    classes = class_names(cfg, groups.num_classes, [report], classes_file)
    dtype = pick_dtype(cfg.engine.precision, dev)
    models.to(dev, dtype)
    top_k = 1 if routing == "hard" else soft_top_k
    how = f"{routing} routing" + (f", top-{top_k} groups" if routing == "soft" else "")
    return LoadedRun(Routed(models, top_k), cfg, classes, dev, dtype, prepare_rule(cfg, as_is),
                     f"TSTL run {run} ({groups.num_groups} groups, {how})", tstl=True)
