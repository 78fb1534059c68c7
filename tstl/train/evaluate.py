"""Multi-view evaluation: per-view logits gathered from all ranks, duplicates removed, merged
per video.

The evaluation loader gives every (video, view) as its own sample and may repeat a few to keep ranks
in step; here each (key, view) counts once, the views of a video are merged by the run's rule
(``test_merge``: ``mean_softmax``, CAST/VideoMAE's mean of per-view probabilities, or
``sum_logits``, PySlowFast's sum of per-view logits), and top-1/top-5, per-class accuracy and the
confusion matrix are computed on the merged predictions.

A multi-head model (CAST's compositional B-CAST on EPIC-KITCHENS: verb and noun) is evaluated per
head the same way (each head's views merged by the rule, its own top-1/top-5, per-class accuracy and
confusion) plus the action, both heads right (``MultiHeadResult``, the last section of this
module).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from tstl.core.config import load_cli_config
from tstl.data import build_eval_loader
from tstl.models import load_checkpoint
from tstl.train import dist
from tstl.train.build import build_model, compute_dtype
from tstl.train.checkpoint import resolve_weights
from tstl.train.config import TrainConfig
from tstl.train.plots import plot_confusion

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    top1: float
    top5: float
    videos: int
    per_class: np.ndarray  # accuracy per class (nan where a class has no video)
    confusion: np.ndarray  # [true, predicted] counts
    probs: dict[str, np.ndarray]  # merged probabilities per video key
    labels: dict[str, int]

    def summary(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "videos": self.videos,
                "mean_class_acc": (float(np.nanmean(self.per_class)) if self.per_class.size
                                   else float("nan"))}


MERGE_RULES = ("mean", "mean_softmax", "sum_logits")


def progress(batches: Iterable[dict], desc: str) -> Iterable[dict]:
    """``batches`` with a tqdm bar and ETA on rank 0 (total: this rank's batches, when the loader
    knows them)."""
    from tqdm import tqdm

    total = len(batches) if hasattr(batches, "__len__") else None
    return tqdm(batches, total=total, desc=desc, unit="batch", disable=not dist.is_main(),
                dynamic_ncols=True, leave=False)


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Iterable[dict], device: torch.device,
            dtype: torch.dtype = torch.float32,
            desc: str = "evaluate") -> dict[tuple[str, int], tuple[np.ndarray, int]]:
    """Logits of every (key, view) this rank sees: {(key, view): (logits, label)}; :func:`merge`
    applies the rule. Rank 0 shows a progress bar named ``desc``."""
    out = {}
    was_training = model.training
    model.eval()
    for batch in progress(batches, desc):
        video = batch["video"].to(device, dtype=dtype, non_blocking=True)
        logits = per_sample(model(video))  # a multi-head model: one dict of head logits per sample
        views = batch.get("view", torch.zeros(len(batch["key"]), dtype=torch.long)).tolist()
        for key, view, z, y in zip(batch["key"], views, logits, per_sample(batch["label"])):
            out[(key, int(view))] = (z, y)
    model.train(was_training)
    return out


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def merge(per_rank: list[dict[tuple[str, int], tuple[np.ndarray, int]]],
          rule: str = "mean") -> tuple[dict, dict]:
    """Union over ranks (a repeated (key, view) counts once), then the views of each video merged
    by ``rule``.

    ``mean``: the mean of the given scores (already probabilities, e.g. TSTL's routed outputs).
    ``mean_softmax``: scores are logits; the mean of their softmax (CAST
    ``engine_for_onemodel.py:249,278``, VideoMAE). ``sum_logits``: scores are logits; their sum
    (PySlowFast ``DATA.ENSEMBLE_METHOD: sum``, ``timesformer/utils/meters.py:107-108``;
    TimeSformer's head has no softmax), stored as its softmax so the merged values stay
    probabilities with the same ranking.
    """
    if rule not in MERGE_RULES:
        raise ValueError(f"unknown merge rule {rule!r}; one of {', '.join(MERGE_RULES)}")
    views: dict[tuple[str, int], tuple[np.ndarray, int]] = {}
    for part in per_rank:
        for kv, value in part.items():
            views.setdefault(kv, value)
    sums: dict[str, list] = {}
    for (key, _), (p, y) in views.items():
        acc = sums.setdefault(key, [np.zeros_like(p, dtype=np.float64), 0, y])
        acc[0] += _softmax(p.astype(np.float64)) if rule == "mean_softmax" else p
        acc[1] += 1
    if rule == "sum_logits":
        probs = {k: _softmax(s).astype(np.float32) for k, (s, _, _) in sums.items()}
    else:
        probs = {k: (s / n).astype(np.float32) for k, (s, n, _) in sums.items()}
    labels = {k: y for k, (_, _, y) in sums.items()}
    return probs, labels


def metrics(probs: dict[str, np.ndarray], labels: dict[str, int], num_classes: int) -> EvalResult:
    keys = sorted(probs)
    if not keys:
        raise ValueError("no predictions to evaluate")
    p = np.stack([probs[k] for k in keys])
    y = np.array([labels[k] for k in keys])
    top = np.argsort(-p, axis=1)[:, :5]
    pred = top[:, 0]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    support = confusion.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(support > 0, np.diag(confusion) / support, np.nan)
    return EvalResult(top1=float((pred == y).mean()), top5=float((top == y[:, None]).any(1).mean()),
                      videos=len(keys), per_class=per_class, confusion=confusion, probs=probs,
                      labels=labels)


def evaluate(model: torch.nn.Module, batches: Iterable[dict], device: torch.device,
             num_classes: int | Mapping[str, int], dtype: torch.dtype = torch.float32,
             merge_rule: str = "mean_softmax", desc: str = "evaluate", dump: Path | None = None,
             classes: Sequence[str] | None = None) -> EvalResult | MultiHeadResult:
    """Predict on this rank's share, gather every rank's in memory, merge views by ``merge_rule``
    (the run's ``test_merge``), compute the metrics (all ranks). ``num_classes`` of a multi-head
    model is head -> classes: the result is then a ``MultiHeadResult``. Rank 0 writes the per-view
    ``dump`` (``write_dump``, with the ``classes`` names) when given (single-head models)."""
    multi = isinstance(num_classes, Mapping)
    if dump is not None and multi:
        raise ValueError("tstl eval --dump writes one score row per view of a single-head model; "
                         "this model has several heads: drop --dump (its report has per-head "
                         "results)")
    local = predict(model, batches, device, dtype, desc)
    gathered = dist.all_gather_objects(local)
    if multi:
        return head_metrics(merge_heads(gathered, merge_rule), num_classes)
    result = metrics(*merge(gathered, merge_rule), num_classes)
    if dump is not None and dist.is_main():
        write_dump(gathered, result, dump, merge_rule, classes)
    return result


def write_dump(per_rank: list[dict[tuple[str, int], tuple[np.ndarray, int]]], result: EvalResult,
               path: Path, merge_rule: str, classes: Sequence[str] | None = None) -> None:
    """``tstl eval --dump``: one Parquet row per video (``key``, ``label``, ``views``: view ids,
    ``logits``: one row of scores per view in that order, ``probs``: the merged probabilities,
    ``pred``: their top-1), so results can be ensembled or re-scored without the model; the merge
    rule and class names are in the file's metadata (``tstl``). Written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    views: dict[str, dict[int, np.ndarray]] = {}
    for part in per_rank:  # a (key, view) a rank repeated to stay in step counts once, as in merge
        for (key, view), (z, _) in part.items():
            views.setdefault(key, {}).setdefault(view, z)
    keys = sorted(result.probs)
    rows = {"key": keys, "label": [result.labels[k] for k in keys],
            "views": [sorted(views[k]) for k in keys],
            "logits": [[views[k][v].astype(np.float32).tolist() for v in sorted(views[k])]
                       for k in keys],
            "probs": [result.probs[k].astype(np.float32).tolist() for k in keys],
            "pred": [int(np.argmax(result.probs[k])) for k in keys]}
    meta = {"merge_rule": merge_rule, "classes": list(classes or [])}
    schema = pa.schema([("key", pa.string()), ("label", pa.int64()),
                        ("views", pa.list_(pa.int32())),
                        ("logits", pa.list_(pa.list_(pa.float32()))),
                        ("probs", pa.list_(pa.float32())), ("pred", pa.int64())],
                       metadata={"tstl": json.dumps(meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.Table.from_pydict(rows, schema=schema), tmp)
    os.replace(tmp, path)


def save_report(result: EvalResult, out: Path, classes: list[str] | None = None) -> None:
    """metrics.json, per_class.csv, confusion.npy/.csv, predictions.npz and confusion.png
    under ``out``.

    The PNG is ``plots.plot_confusion``'s: class names on the axes for few classes, a size-capped
    heatmap with confused classes placed together for many (``plots.most_confused_pairs`` names them
    in the reports). A ``MultiHeadResult`` is written by ``save_head_report``."""
    if isinstance(result, MultiHeadResult):
        save_head_report(result, out, classes)  # type: ignore[arg-type]
        return
    out.mkdir(parents=True, exist_ok=True)
    names = classes or [str(i) for i in range(len(result.per_class))]
    (out / "metrics.json").write_text(json.dumps(result.summary(), indent=1))
    with open(out / "per_class.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "class", "videos", "accuracy"])
        for i, (name, acc) in enumerate(zip(names, result.per_class)):
            w.writerow(
                [i, name, int(result.confusion[i].sum()), "" if np.isnan(acc) else f"{acc:.4f}"])
    np.save(out / "confusion.npy", result.confusion)
    np.savetxt(out / "confusion.csv", result.confusion, fmt="%d", delimiter=",")
    keys = sorted(result.probs)
    np.savez(out / "predictions.npz", keys=np.array(keys),
             probs=np.stack([result.probs[k] for k in keys]),
             labels=np.array([result.labels[k] for k in keys]))
    plot_confusion(result.confusion, names, out / "confusion.png")


def evaluate_checkpoint(checkpoint: str | Path, configs: Sequence[str | Path] = (),
                        overrides: Sequence[str] = (), out: str | Path | None = None,
                        dump: bool = False) -> tuple[EvalResult, Path]:
    """Multi-view evaluation of any checkpoint ``load_checkpoint`` accepts on the
    run's ``val_split``.

    Args:
        checkpoint: a checkpoint file, a DeepSpeed tag folder or a run folder (its best checkpoint).
        configs: YAML files of the run; default: the run's ``config.yaml`` next to the checkpoint.
        overrides: dotted ``key=value`` overrides.
        out: report folder; default ``<out_dir>/eval-<name of the checkpoint's folder>``.
        dump: also write the per-view logits (``write_dump``) to ``<out>/views.parquet``.

    Returns:
        The result (on every rank) and the report folder (written by rank 0).
    """
    weights, run_cfg = resolve_weights(checkpoint)
    files = list(configs) or ([run_cfg] if run_cfg else [])
    cfg = load_cli_config(TrainConfig, [str(f) for f in files], list(overrides))
    device = dist.init()
    loader = build_eval_loader(cfg.data, cfg.shard_dir(cfg.val_split), rank=dist.rank(),
                               world_size=dist.world()).to(device)
    num_classes = cfg.model.num_classes or loader.num_classes
    # the checkpoint holds every weight: the run's model.init files (pre-trained backbones) need not
    # be read first
    model, _ = build_model(replace(cfg.model, init=[]), num_classes)
    report = load_checkpoint(model, weights, trusted=list(cfg.model.trusted_checkpoints))
    logger.info("evaluating %s (%s) on %s", weights, report.format, cfg.shard_dir(cfg.val_split))
    dtype = compute_dtype(cfg.engine.precision, device)
    dest = Path(out) if out else Path(cfg.out_dir) / f"eval-{weights.parent.name}"
    dump_path = dest / "views.parquet" if dump else None
    res = evaluate(model.to(device, dtype), loader, device, num_classes, dtype, cfg.test_merge,
                   f"eval {cfg.val_split}", dump_path, loader.classes)
    if dist.is_main():
        save_report(res, dest, loader.classes)
    return res, dest


# ------------------------------------------------------------------------------ multi-head models

ACTION_BASE = 1000
"""CAST's action id is ``verb * 1000 + noun`` (KHU-VLL/CAST ``engine_for_compomodel.py:166,332``):
labels in head order, base 1000."""


def per_sample(x: torch.Tensor | Mapping[str, torch.Tensor]) -> list:
    """A batch's logits (float32 numpy rows) or labels (ints), one per sample; for a multi-head
    model one dict head -> row (or label) per sample."""
    if isinstance(x, Mapping):
        cols = {h: per_sample(v) for h, v in x.items()}
        return [dict(zip(cols, row)) for row in zip(*cols.values())]
    if x.dtype.is_floating_point:
        return list(x.float().cpu().numpy())
    return [int(y) for y in x.tolist()]


def action_id(labels: Mapping[str, int]) -> int:
    """One integer per combination of head labels (``verb * 1000 + noun`` for EPIC-KITCHENS)."""
    out = 0
    for y in labels.values():
        out = out * ACTION_BASE + int(y)
    return out


@dataclass
class MultiHeadResult:
    """A multi-head evaluation: each head's ``EvalResult`` and the action, every head right.

    ``top1``/``top5``/``videos`` are the action's, so callers that track one number (validation
    logs, the best checkpoint) track CAST's: action top-1 (``run_bidirection_compo.py:481``). Action
    top-5: every head's label is among its 5 most probable (``engine_for_compomodel.py:335``).
    """

    top1: float
    top5: float
    videos: int
    heads: dict[str, EvalResult]
    actions: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Action id -> (videos, videos right)."""

    def action_per_class(self) -> dict[int, float]:
        return {a: right / n for a, (n, right) in sorted(self.actions.items())}

    def summary(self) -> dict:
        accs = list(self.action_per_class().values())
        return {"top1": self.top1, "top5": self.top5, "videos": self.videos,
                "mean_class_acc": float(np.mean(accs)) if accs else float("nan"),
                "heads": {h: r.summary() for h, r in self.heads.items()}}


def merge_heads(per_rank: list[dict], rule: str = "mean") -> dict[str, tuple[dict, dict]]:
    """``merge`` of each head's views: head -> (probabilities, labels) per video."""
    heads = next((list(z) for part in per_rank for z, _ in part.values()), [])
    return {h: merge([{kv: (z[h], y[h]) for kv, (z, y) in part.items()} for part in per_rank], rule)
            for h in heads}


def head_metrics(merged: Mapping[str, tuple[dict, dict]],
                 num_classes: Mapping[str, int]) -> MultiHeadResult:
    """Each head's metrics and the action's from ``merge_heads``' merged predictions."""
    if not merged or set(merged) != set(num_classes):
        raise ValueError(f"predictions for heads {sorted(merged)}, the model has "
                         f"{sorted(num_classes)}")
    heads = {h: metrics(probs, labels, num_classes[h]) for h, (probs, labels) in merged.items()}
    keys = sorted(next(iter(merged.values()))[0])
    top1 = top5 = 0
    actions: dict[int, tuple[int, int]] = {}
    for key in keys:
        labels = {h: merged[h][1][key] for h in merged}
        ranked = {h: np.argsort(-merged[h][0][key])[:5] for h in merged}
        right = all(ranked[h][0] == y for h, y in labels.items())
        top1 += right
        top5 += all(y in ranked[h] for h, y in labels.items())
        n, ok = actions.get(action_id(labels), (0, 0))
        actions[action_id(labels)] = (n + 1, ok + right)
    return MultiHeadResult(top1 / len(keys), top5 / len(keys), len(keys), heads, actions)


def save_head_report(result: MultiHeadResult, out: Path,
                     classes: Mapping[str, list[str]] | None = None) -> None:
    """``metrics.json`` (action and heads), ``actions.csv`` (per action: id, head labels and names,
    videos, accuracy) and one ``save_report`` folder per head under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result.summary(), indent=1))
    names = {h: (classes or {}).get(h) or [str(i) for i in range(len(r.per_class))]
             for h, r in result.heads.items()}
    for h, r in result.heads.items():
        save_report(r, out / h, names[h])
    with open(out / "actions.csv", "w", newline="") as f:
        w = csv.writer(f)
        # EPIC-KITCHENS' column names: <head>_class the id, <head> the name
        w.writerow(["action", *(f"{h}_class" for h in result.heads), *result.heads, "videos",
                    "accuracy"])
        for a, (n, right) in sorted(result.actions.items()):
            labels = _action_labels(a, len(result.heads))
            w.writerow([a, *labels, *(names[h][y] for h, y in zip(result.heads, labels)), n,
                        f"{right / n:.4f}"])


def _action_labels(a: int, heads: int) -> list[int]:
    out = []
    for _ in range(heads):
        a, y = divmod(a, ACTION_BASE)
        out.append(y)
    return out[::-1]
