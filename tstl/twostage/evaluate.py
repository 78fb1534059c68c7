"""Routed multi-view evaluation of a TSTL run, next to a single B-CAST on the same views.

Every view is routed on its own (the selector sees the view, the chosen expert(s) classify it), then
the views of a video are averaged in probability space as in ``tstl.train.evaluate``. One pass
gives, per view:

* ``selector``: the selector's group probabilities (selector accuracy);
* ``hard``: the top group's expert (TSTL's rule; 2 B-CAST forwards per view);
* ``soft``: the top-k groups' experts weighted by the selector (1 + k forwards per view);
* ``oracle``: the true group's expert (per-expert accuracy on its own group; it reuses the routed
  outputs and runs an extra forward only for views the selector sent elsewhere);
* ``baseline``: a single B-CAST (``tstl.baseline``), when given.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tstl.core.config import load_config
from tstl.data import build_eval_loader
from tstl.models import create_model, load_checkpoint
from tstl.models.checkpoint import read_checkpoint
from tstl.train import dist
from tstl.train.build import build_model, compute_dtype
from tstl.train.checkpoint import resolve_weights
from tstl.train.config import TrainConfig
from tstl.train.evaluate import EvalResult, merge, metrics, progress, save_report
from tstl.train.plots import most_confused_pairs, pairs_table
from tstl.twostage.config import TSTLConfig
from tstl.twostage.groups import ClassGroups, load_groups
from tstl.twostage.routing import RoutedOutput, expert_columns, route
from tstl.twostage.stagefile import load_stage_file, read_stage_file
from tstl.twostage.stages import expert_file, selector_file
from tstl.twostage.train import resolve_groups

logger = logging.getLogger(__name__)

FIELDS = ("selector", "hard", "soft", "oracle", "baseline")


@dataclass
class RoutedModels:
    """The selector and one expert per group (``experts[g]`` outputs logits over
    ``groups.groups[g]`` in order)."""

    selector: nn.Module
    experts: list[nn.Module]
    groups: ClassGroups

    def to(self, device: torch.device, dtype: torch.dtype) -> RoutedModels:
        # experts share frozen Parameter objects with the selector; Module.to converts each
        # parameter in place (param.data is replaced), so the shared objects stay shared and
        # one copy moves
        for m in (self.selector, *self.experts):
            m.to(device, dtype)
        return self


def load_run(out_dir: str | Path, groups: ClassGroups, verify_hashes: bool = True) -> RoutedModels:
    """The selector and experts a ``train_two_stage`` run wrote; experts with the same frozen
    sources as the selector share its frozen tensors (one CLIP + VideoMAE in memory)."""
    missing = [str(p) for p in [selector_file(out_dir)]
               + [expert_file(out_dir, g) for g in range(groups.num_groups)]
               if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{out_dir}: the TSTL run is not finished, missing {missing[:4]}; "
                                "run make train-tstl again to finish it")
    selector = load_stage_file(selector_file(out_dir), verify_hashes=verify_hashes)
    frozen = read_stage_file(selector_file(out_dir))["frozen"]
    experts = []
    for g in range(groups.num_groups):
        path = expert_file(out_dir, g)
        same = read_stage_file(path)["frozen"] == frozen
        experts.append(
            load_stage_file(path, trunk=selector if same else None, verify_hashes=verify_hashes))
    return RoutedModels(selector, experts, groups)


def _head_classes(path: str | Path) -> int:
    sd = read_checkpoint(path)
    heads = [v for k, v in sd.items() if k.removeprefix("module.") == "head.weight"]
    if not heads:
        raise ValueError(
            f"{path}: no head.weight; expected a CAST-layout selector or expert checkpoint")
    return int(heads[0].shape[0])


def load_released(model_name: str, selector_path: str | Path, expert_paths: Sequence[str | Path],
                  groups: ClassGroups, **model_kwargs) -> RoutedModels:
    """TSTL's released checkpoints (full CAST layout): a selector with a head over groups and
    experts whose head covers every class (TSTL's: the chosen expert's softmax over all classes is
    the prediction, as TSTL's "maxlogit" rule with one expert) or only their group."""
    if len(expert_paths) != groups.num_groups:
        raise ValueError(f"{len(expert_paths)} expert checkpoints for {groups.num_groups} groups")

    def build(path: str | Path, num_classes: int) -> nn.Module:
        model = create_model(model_name, num_classes=num_classes, **model_kwargs)
        load_checkpoint(model, path)
        return model.eval()

    if _head_classes(selector_path) != groups.num_groups:
        raise ValueError(f"{selector_path}: head has {_head_classes(selector_path)} outputs, the "
                         f"groups {groups.num_groups}")
    selector = build(selector_path, groups.num_groups)
    experts: list[nn.Module] = []
    for g, path in enumerate(expert_paths):
        n = _head_classes(path)
        if n not in (groups.num_classes, len(groups.groups[g])):
            raise ValueError(f"{path}: head has {n} outputs; expected {groups.num_classes} (all "
                             f"classes) or {len(groups.groups[g])} (group {g})")
        experts.append(build(path, n))
    return RoutedModels(selector, experts, groups)


@dataclass
class Tally:
    """B-CAST forwards run by this evaluation, per kind."""

    views: int = 0
    """Views run (each one selector forward), the loader's padding repeats included."""
    routed: list[int] = field(default_factory=list)
    """Views each expert ran on (the soft top-k routing, which includes the hard one)."""
    hard: list[int] = field(default_factory=list)
    """Views the selector's top group sent to each expert (what hard routing runs)."""
    oracle_extra: int = 0
    baseline: int = 0


def _oracle(x: torch.Tensor, out: RoutedOutput, true_group: torch.Tensor, models: RoutedModels,
            tally: Tally) -> torch.Tensor:
    """Each view's true-group expert in global class space, reusing the routed outputs
    where possible."""
    hit = out.groups == true_group.unsqueeze(1)  # [B, k]
    oracle = (out.slot_probs * hit.unsqueeze(-1)).sum(1)
    for g in true_group[~hit.any(1)].unique().tolist():
        rows = ((true_group == g) & ~hit.any(1)).nonzero(as_tuple=True)[0]
        probs = models.experts[g](x[rows]).float().softmax(-1)
        cols = expert_columns(models.groups, g, probs.shape[1], x.device)
        oracle[rows.unsqueeze(1), cols.unsqueeze(0)] = probs
        tally.oracle_extra += int(rows.numel())
    return oracle


@torch.no_grad()
def predict_routed(models: RoutedModels, batches: Iterable[dict], device: torch.device, top_k: int,
                   dtype: torch.dtype = torch.float32, baseline: nn.Module | None = None
                   ) -> tuple[dict[tuple[str, int], dict], Tally]:
    """Per (key, view) of this rank: ``{field: probabilities}`` for every field of ``FIELDS``
    plus ``label``."""
    groups = models.groups
    class_to_group = torch.as_tensor(groups.class_to_group, device=device)
    tally = Tally(routed=[0] * groups.num_groups, hard=[0] * groups.num_groups)
    out: dict[tuple[str, int], dict] = {}
    for batch in progress(batches, "routed eval"):
        x = batch["video"].to(device, dtype=dtype, non_blocking=True)
        labels = batch["label"].to(device)
        sel_logits = models.selector(x).float()
        routed = route(x, sel_logits, models.experts, groups, top_k=top_k)
        oracle = _oracle(x, routed, class_to_group[labels], models, tally)
        fields = {"selector": sel_logits.softmax(-1), "hard": routed.slot_probs[:, 0],
                  "soft": routed.probs, "oracle": oracle}
        if baseline is not None:
            fields["baseline"] = baseline(x).float().softmax(-1)
            tally.baseline += len(x)
        tally.views += len(x)
        tally.routed = [a + b for a, b in zip(tally.routed, routed.expert_calls)]
        top = torch.bincount(routed.groups[:, 0], minlength=groups.num_groups).tolist()
        tally.hard = [a + b for a, b in zip(tally.hard, top)]
        views = batch.get("view", torch.zeros(len(x), dtype=torch.long)).tolist()
        arrays = {k: v.cpu().numpy() for k, v in fields.items()}
        for i, (key, view, y) in enumerate(zip(batch["key"], views, batch["label"].tolist())):
            out[(key, int(view))] = {"label": int(y), **{k: v[i] for k, v in arrays.items()}}
    return out, tally


def _field(per_rank: list[dict], name: str, label_of=lambda y: y) -> tuple[dict, dict]:
    return merge([{kv: (rec[name], label_of(rec["label"])) for kv, rec in part.items()
                   if name in rec}
                  for part in per_rank])


def summarize(per_rank: list[dict], tallies: list[Tally], groups: ClassGroups, top_k: int) -> dict:
    """Metrics of every field on the merged views of all ranks (on rank 0)."""
    c2g = groups.class_to_group
    results: dict[str, EvalResult] = {}
    for name in ("hard", "soft", "oracle", "baseline"):
        probs, labels = _field(per_rank, name)
        if probs:
            results[name] = metrics(probs, labels, groups.num_classes)
    sel = metrics(*_field(per_rank, "selector", lambda y: int(c2g[y])), groups.num_groups)
    oracle = results["oracle"]
    expert_acc = []
    for g, members in enumerate(groups.groups):
        videos = int(oracle.confusion[list(members)].sum())
        correct = int(np.trace(oracle.confusion[np.ix_(members, members)]))
        expert_acc.append({"group": g, "classes": list(members), "videos": videos,
                           "accuracy": correct / videos if videos else None})
    # distinct (video, view) pairs: ranks' padding repeats
    views = len({kv for part in per_rank for kv in part})
    routed = np.sum([t.routed for t in tallies], axis=0)
    hard = np.sum([t.hard for t in tallies], axis=0)
    summary = {
        "videos": sel.videos, "views": views, "num_groups": groups.num_groups, "soft_top_k": top_k,
        "selector_acc": sel.top1, "selector_top5": sel.top5,
        "methods": {name: {**r.summary(),
                           "forwards_per_view": _cost(name, top_k, groups.num_groups)}
                    for name, r in results.items()},
        "experts": expert_acc,
        "forwards": {"views_run": sum(t.views for t in tallies),
                     "selector": sum(t.views for t in tallies), "routed_experts": routed.tolist(),
                     "hard_routed": hard.tolist(),
                     "oracle_extra": sum(t.oracle_extra for t in tallies),
                     "baseline": sum(t.baseline for t in tallies)},
    }
    return {"summary": summary, "results": results, "selector": sel}


def _cost(name: str, top_k: int, num_groups: int) -> float | None:
    """B-CAST forwards a method needs per view on its own (not what this combined
    evaluation ran)."""
    return {"hard": 2.0, "soft": 1.0 + min(top_k, num_groups), "baseline": 1.0}.get(name)


def write_report(res: dict, out: Path, classes: list[str] | None, title: str,
                 notes: Sequence[str] = ()) -> str:
    """``metrics.json``, ``report.md`` and a ``save_report`` folder per method under ``out`` (each
    with its confusion PNG: class names for few classes, capped and cluster-ordered for many);
    ``report.md`` names the most confused pairs of hard routing, of the single B-CAST when given,
    and of the selector's groups."""
    out.mkdir(parents=True, exist_ok=True)
    s = res["summary"]
    (out / "metrics.json").write_text(json.dumps(s, indent=1))
    for name, r in res["results"].items():
        save_report(r, out / name, classes)
    save_report(res["selector"], out / "selector", [f"group {g}" for g in range(s["num_groups"])])
    names = {"baseline": "single B-CAST (tstl.baseline)",
             "hard": "TSTL, hard routing (top-1 group)",
             "soft": f"TSTL, soft routing (top-{s['soft_top_k']} groups)",
             "oracle": "oracle routing (true group's expert; upper bound)"}
    lines = [f"# {title}", "",
             f"{s['videos']} videos, {s['views'] // max(s['videos'], 1)} views each. "
             f"{s['num_groups']} groups; selector accuracy {s['selector_acc']:.4f} "
             f"(chance {1 / s['num_groups']:.4f}).", "",
             "| model | top-1 | top-5 | mean class acc | B-CAST forwards per view |",
             "|---|---|---|---|---|"]
    for name in ("baseline", "hard", "soft", "oracle"):
        if name in s["methods"]:
            m = s["methods"][name]
            cost = f"{m['forwards_per_view']:.0f}" if m["forwards_per_view"] else "n/a"
            lines.append(f"| {names[name]} | {m['top1']:.4f} | {m['top5']:.4f} | "
                         f"{m['mean_class_acc']:.4f} | {cost} |")
    lines += ["", "## Experts on their own group", "",
              "| group | classes | videos | accuracy | views the selector sent here (hard) |",
              "|---|---|---|---|---|"]
    for e, calls in zip(s["experts"], s["forwards"]["hard_routed"]):
        acc = f"{e['accuracy']:.4f}" if e["accuracy"] is not None else "n/a"
        names_g = ", ".join(classes[c] if classes else str(c) for c in e["classes"])
        lines.append(f"| {e['group']} | {names_g} | {e['videos']} | {acc} | {calls} |")
    lines += ["", "Routing per view, views averaged in probability space. The soft-routing row's "
                  "experts include the hard one, so one pass measures both.",
              *(["", *notes] if notes else [])]
    class_names = classes or [str(i) for i in range(len(res["results"]["hard"].per_class))]
    group_names = [f"group {g}" for g in range(s["num_groups"])]
    for name, result, label_names in (("hard", res["results"].get("hard"), class_names),
                                      ("baseline", res["results"].get("baseline"), class_names),
                                      ("selector", res["selector"], group_names)):
        if result is not None:
            title = names.get(name, "selector (true group -> chosen group)")
            lines += ["", f"## Most confused pairs: {title}", "",
                      *pairs_table(most_confused_pairs(result.confusion, 10), label_names)]
    lines += ["", "## Confusion matrices", "",
              "Per method under its folder (`<method>/confusion.png`, `per_class.csv`).", "",
              "![hard routing](hard/confusion.png) ![selector](selector/confusion.png)"]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def evaluate_routed(models: RoutedModels, batches: Iterable[dict], device: torch.device, top_k: int,
                    dtype: torch.dtype = torch.float32,
                    baseline: nn.Module | None = None) -> dict | None:
    """Predict on this rank's share; rank 0 gathers every rank's and returns the summary (None on
    other ranks)."""
    local, tally = predict_routed(models, batches, device, top_k, dtype, baseline)
    parts, tallies = dist.gather_objects(local), dist.gather_objects(tally)
    return summarize(parts, tallies, models.groups, top_k) if parts is not None else None


def load_baseline(cfg: TSTLConfig, num_classes: int) -> tuple[nn.Module, str]:
    """The single B-CAST of ``tstl.baseline`` with its run's model settings (the TSTL run's when it
    is a file), and a line for the report."""
    weights, run_cfg = resolve_weights(cfg.tstl.baseline)
    model_cfg = load_config(TrainConfig, [run_cfg]).model if run_cfg else cfg.model
    model, _ = build_model(replace(model_cfg, init=[]), num_classes)
    load_checkpoint(model, weights)
    logger.info("baseline: %s (%s)", weights, model_cfg.name)
    return model.eval(), (f"Single B-CAST: `{weights}` ({model_cfg.name}; a run folder gives its "
                          "best checkpoint).")


def evaluate_tstl(cfg: TSTLConfig, selector: str | Path | None = None,
                  experts: Sequence[str | Path] = (),
                  out: str | Path | None = None) -> tuple[dict | None, Path]:
    """Routed multi-view evaluation of a TSTL run (or of released checkpoints) on ``val_split``,
    next to ``tstl.baseline`` when given; rank 0 writes ``metrics.json``/``report.md``
    under ``out``.

    Args:
        cfg: the TSTL config the run was trained with.
        selector, experts: released checkpoints (CAST layout; one expert per group, in order)
            instead of the run's stage files.
        out: report folder; default ``<out_dir>/eval``.

    Returns:
        The summary (``evaluate_routed``; None on ranks other than 0) and the report folder.
    """
    device = dist.init()
    run = Path(cfg.out_dir)
    pinned = run / "groups.json"
    # a trained run knows its groups; num_groups defaults don't apply
    if pinned.exists() and not cfg.tstl.groups:
        groups = load_groups(pinned)
    else:  # a group file must match the run's; released checkpoints need one
        groups = resolve_groups(cfg)
    if selector:
        models = load_released(cfg.model.name, selector, list(experts), groups, **cfg.model.kwargs)
    else:
        models = load_run(run, groups)
    loader = build_eval_loader(cfg.data, cfg.shard_dir(cfg.val_split), rank=dist.rank(),
                               world_size=dist.world()).to(device)
    dtype = compute_dtype(cfg.engine.precision, device)
    baseline, note = load_baseline(cfg, groups.num_classes) if cfg.tstl.baseline else (None, "")
    baseline = baseline.to(device, dtype) if baseline is not None else None
    res = evaluate_routed(models.to(device, dtype), loader, device, cfg.tstl.soft_top_k, dtype,
                          baseline)
    report = Path(out) if out else run / "eval"
    if dist.is_main():
        write_report(res, report, loader.classes,
                     f"TSTL routed evaluation: {cfg.dataset} {cfg.val_split} ({run})",
                     [note] if note else [])
    return res, report
