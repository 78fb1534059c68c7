"""Refuse to resume a run with a different configuration, unless every change is known to be safe.

A rerun with the same ``out_dir`` resumes the run's newest complete checkpoint. Before, a rerun with
other hyperparameters silently continued the old run and overwrote its ``config.yaml``; now the
resolved configs (the run's ``config.yaml`` and the new one) are compared key by key and the rerun
stops with the diff unless every change is in ``SAFE`` or the user accepts it
with ``checkpoint.accept_config_change=true``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from tstl.core.config import ConfigError, dump_yaml, flatten

logger = logging.getLogger(__name__)

SAFE: dict[str, str] = {
    "epochs": "more epochs than before (the cosine schedule is stretched to the new end)",
    "out_dir": "the run folder itself (moved or mounted elsewhere)",
    "data_dir": "where the same shards are mounted",
    "log_every": "logging cadence",
    "val_every": "validation cadence",
    "test_at_end": "whether to test at the end",
    "max_nonfinite": "tolerance for non-finite losses",
    "data.num_workers": "loader processes",
    "data.eval_batch_size": "evaluation batch size",
    "data.test_views": "views of the final test",
    "checkpoint.*": "checkpoint cadence, rotation and this switch",
}
"""Keys whose change cannot alter the trajectory of the training steps already taken (a prefix ends
in ``.*``)."""


def is_safe(key: str, old: Any, new: Any) -> bool:
    if key == "epochs":
        return isinstance(old, int) and isinstance(new, int) and new >= old
    return key in SAFE or any(p.endswith(".*") and key.startswith(p[:-1]) for p in SAFE)


ABSENT = "<absent>"


def diff(old: dict, new: dict, defaults: dict | None = None) -> list[tuple[str, Any, Any]]:
    """(key, old, new) of every key whose value differs; a missing key is ``<absent>``. With
    ``defaults``, a key that ``old`` lacks (a config.yaml written before the key existed) and that
    ``new`` keeps at its default is no change."""
    a, b, d = flatten(old), flatten(new), flatten(defaults or {})
    return [(k, a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(set(a) | set(b))
            if a.get(k, ABSENT) != b.get(k, ABSENT)
            and not (k not in a and k in d and d[k] == b.get(k, ABSENT))]


def check(config_file: Path, cfg: Any, accept: bool) -> list[tuple[str, Any, Any]]:
    """Compare ``cfg`` with the run's ``config_file``; raise ``ConfigError`` with the diff on an
    unsafe change.

    Returns the changes (all safe, or accepted). Both sides are compared as YAML (tuples become
    lists as in the file).
    """
    if not config_file.exists():
        return []
    old = yaml.safe_load(config_file.read_text()) or {}
    new = yaml.safe_load(dump_yaml(cfg))
    changes = diff(old, new, yaml.safe_load(dump_yaml(type(cfg)())))
    unsafe = [c for c in changes if not is_safe(*c)]
    if unsafe and not accept:
        lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in unsafe)
        raise ConfigError(
            f"{config_file.parent} has a checkpoint of a run with another configuration; resuming "
            f"it would mix the two. Changed (run's config.yaml -> this command):\n{lines}\n"
            "Use another out_dir for a new run, restore these values to resume, or pass "
            "checkpoint.accept_config_change=true to resume with the new values (config.yaml is "
            "then overwritten). Safe changes that need no flag: " + ", ".join(SAFE)
            + " (see docs/training.md).")
    for key, a, b in changes:
        logger.warning("config change on resume: %s: %r -> %r (%s)", key, a, b,
                       ("safe" if is_safe(key, a, b)
                        else "accepted: checkpoint.accept_config_change"))
    return changes
