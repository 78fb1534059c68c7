"""Checks a run's config can start, before anything expensive (the DeepSpeed launcher, data
loading, weights).

``tstl train --check`` (what ``make train`` runs before it launches) and every ``train``/``eval``
command call ``check_run``: each problem is a ``UsageError`` naming what is wrong and the fix,
reported once with exit code 2 instead of a traceback on every rank after launch. The model is built
on the ``meta`` device (no memory, well under a second for ViT-B) so unknown names, unknown
architecture arguments and bad values all surface here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from tstl.core.exitcodes import UsageError
from tstl.core.shards import INDEX
from tstl.train.config import ModelConfig, TrainConfig

__all__ = ["check_config_files", "check_decoder", "check_init", "check_model", "check_run",
           "check_shards", "check_weights", "shards_hint"]


def check_config_files(files: Sequence[str | Path]) -> None:
    """Every ``--config`` file exists; a missing ``configs/<kind>/<name>.yaml`` lists the names that
    do exist (``make train DATASET=kinetics`` -> the available datasets)."""
    for f in (Path(str(w)) for w in files if "=" not in str(w)):
        if f.is_file():
            continue
        folder = f.parent
        have = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
        kind = {"data": "dataset", "model": "model"}.get(folder.name, "config")
        hint = (f"available {kind}s in {folder}: {', '.join(have)}" if have
                else "check the path; `tstl print-config --list` names the shipped recipes")
        if kind == "dataset":
            hint += (" (DATASET=<name> for make; a new dataset needs configs/data/<name>.yaml, "
                     "docs/pipeline.md)")
        raise UsageError(f"config file not found: {f}", hint)


def check_model(cfg: ModelConfig, num_classes: int = 8) -> None:
    """``model.name`` is registered and ``model.kwargs`` are arguments of its builder with
    valid values.

    Builds the model on the meta device (``num_classes`` only fills the head; its value does not
    matter; 0 keeps the variant's own, as a multi-head model needs: its heads come from the shard
    set)."""
    import torch

    from tstl.models import create_model, list_models

    names = list_models()
    if cfg.name not in names:
        import difflib

        close = difflib.get_close_matches(cfg.name, names, n=1)
        raise UsageError(f"model.name: unknown model '{cfg.name}'",
                         (f"did you mean '{close[0]}'? " if close else "")
                         + f"registered models: {', '.join(names)}")
    try:
        with torch.device("meta"):
            head = {"num_classes": num_classes} if num_classes else {}
            create_model(cfg.name, drop_path_rate=cfg.drop_path_rate, **head, **cfg.kwargs)
    except (TypeError, ValueError) as e:
        raise UsageError(f"model.kwargs of {cfg.name}: {e}",
                         "fix or remove that model.kwargs.<argument>") from e


def shards_hint(cfg: TrainConfig, split: str) -> str:
    """The command that builds the shard set of ``split``."""
    m = re.search(r"split(\d+)$", split)
    split_arg = f" SPLIT={m.group(1)}" if m and m.group(1) != "1" else ""
    data_arg = f" DATA_DIR={cfg.data_dir}" if cfg.data_dir != "data" else ""
    return (f"build it with `make shards DATASET={cfg.dataset}{split_arg}{data_arg}` or "
            f"`tstl shards build --dataset {cfg.dataset} --data-dir {cfg.data_dir}"
            f"{' --split ' + m.group(1) if split_arg else ''}`, "
            "or point data_dir= at the folder that holds it")


def check_shards(cfg: TrainConfig, splits: Sequence[str]) -> None:
    """Each split's shard set (``<data_dir>/<dataset>/shards/<split>/shards.json``) exists."""
    if "://" in cfg.data_dir or cfg.data_dir.startswith("pipe:") or cfg.data.shard_url_template:
        # remote (a URL, or shards and their list read through data.shard_url_template): the
        # loader reports
        return
    for split in dict.fromkeys(splits):
        folder = cfg.shard_dir(split)
        if not (folder / INDEX).is_file():
            what = ("has no shards.json (an unfinished build?)" if folder.is_dir()
                    else "does not exist")
            raise UsageError(f"shard set {folder} {what}", shards_hint(cfg, split))


def check_init(cfg: ModelConfig, entries: Sequence[str] | None = None,
               key: str = "model.init") -> None:
    """Every ``model.init`` entry (or ``entries``, named ``key`` in the error) resolves to a
    checkpoint that loads into ``cfg``'s model: the file is readable and allowed, its layout is the
    model's family, no key it must provide is missing and every shape fits after the documented
    resizes (a head of another number of classes is re-initialised, as training does). The model is
    built on the meta device and only the checkpoint's key/shape table is read
    (``tstl.models.checkpoint.check_checkpoint``), so this costs seconds, not a load.
    """
    from tstl.train.checkpoint import resolve_weights

    paths = []
    for entry in cfg.init if entries is None else entries:
        try:
            paths.append(resolve_weights(entry)[0])
        except FileNotFoundError as e:
            raise UsageError(f"{key}: {e}", "give a checkpoint file, a DeepSpeed tag folder, a "
                             "Hugging Face model folder or a run folder (docs/models.md lists the "
                             "formats)") from None
    if paths:
        model = _meta_model(cfg)
        for path in paths:
            check_weights(model, path, key, trusted=list(cfg.trusted_checkpoints))


def _meta_model(cfg: ModelConfig):
    import torch

    from tstl.models import create_model

    with torch.device("meta"):
        return create_model(cfg.name, num_classes=cfg.num_classes or 8,
                            drop_path_rate=cfg.drop_path_rate, **cfg.kwargs)


def check_weights(model, path: Path, key: str, trusted: Sequence[str] = ()) -> None:
    """``path`` would load into ``model`` (any device, meta included) as ``build_model`` loads it;
    each failure is a ``UsageError`` naming the file and the fix."""
    from tstl.models import checkpoint as ck

    name = type(model).__name__
    try:
        ck.check_checkpoint(model, path, reinit_mismatched=("head.",), trusted=list(trusted))
    except ck.UntrustedCheckpointError as e:
        names = ", ".join(e.globals) or "unsupported content"
        raise UsageError(f"{key}: {path}: refused: its pickle names {names}",
                         "if you trust the file, list it in model.trusted_checkpoints (or "
                         "$TSTL_TRUSTED_CHECKPOINTS); better, re-save its weights with "
                         "torch.save(state_dict)") from None
    except ck.UnsupportedLayoutError as e:
        raise UsageError(f"{key}: {e}", "give this model a checkpoint of its family, or set "
                         "model.name to the model named above (docs/models.md lists the layouts)"
                         ) from None
    except ck.CheckpointMismatchError as e:
        what = _one_line(str(e).replace(" Pass strict=False to load anyway.", ""))
        raise UsageError(f"{key}: {what}",
                         f"this checkpoint does not fit {name} as configured: compare model.name "
                         "and model.kwargs (num_frames, img_size, embed_dim, depth, ...) with the "
                         "checkpoint's, or use the checkpoint the model expects") from None
    except ValueError as e:
        raise UsageError(f"{key}: {_one_line(str(e))}", "check that the file is a complete "
                         "checkpoint (re-download or re-save it); docs/models.md lists the formats"
                         ) from None


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()).replace(":;", ":")


def check_decoder(name: str) -> None:
    """``data.decoder`` can run in this environment (torchcodec needs a CUDA torch build and
    FFmpeg libraries)."""
    from tstl.data.decode import check_decoder as probe

    try:
        probe(name)
    except RuntimeError as e:
        raise UsageError(f"data.decoder: {e}") from None


def check_run(cfg: TrainConfig, *, train: bool = True, model: bool = True) -> None:
    """Everything ``train`` (``train=True``) or an evaluation (``train=False``) needs before
    it starts."""
    splits = [cfg.train_split] if train else []
    if not train or cfg.val_every > 0 or cfg.test_at_end:
        splits.append(cfg.val_split)
    check_shards(cfg, splits)
    check_decoder(cfg.data.decoder)
    if model:
        check_model(cfg.model, cfg.model.num_classes)
        check_init(cfg.model)


