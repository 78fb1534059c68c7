"""The class-group file format, owned here: ``ClassGroups``, loading/saving both formats,
validation.

Group generation (balanced, from a confusion matrix) lives in ``tstl.twostage.groups``.

Two on-disk formats are supported:

* TSTL's ``class_grouping.json``: ``class_to_head`` (str class -> group), ``head_to_classes``
  (str group -> list of classes, list position = local id), ``head_to_local`` (str group ->
  {str class: local id}), ``num_heads`` and ``num_classes``. The fields are redundant; all are
  checked.
* Our format (``"format": "tstl-groups/v1"``): ``{"format": ..., "num_classes": N,
  "groups": [[c, ...], ...]}``. Group ``g`` is ``groups[g]``; a class's local id is its position
  there.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

OUR_FORMAT = "tstl-groups/v1"


class GroupFileError(ValueError):
    """A group file is malformed or inconsistent."""


@dataclass(frozen=True)
class ClassGroups:
    """A partition of ``num_classes`` global classes into ordered groups.

    Attributes:
        groups: ``groups[g]`` lists the global class ids of group ``g``; list position is the local
            id.
        num_classes: Number of global classes.
    """

    groups: tuple[tuple[int, ...], ...]
    num_classes: int

    def __post_init__(self) -> None:
        _validate(self.groups, self.num_classes, "<in memory>")

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def class_to_group(self) -> np.ndarray:
        """Array mapping each global class id to its group id."""
        out = np.empty(self.num_classes, dtype=np.int64)
        for g, members in enumerate(self.groups):
            out[list(members)] = g
        return out

    @property
    def class_to_local(self) -> np.ndarray:
        """Array mapping each global class id to its local id within its group."""
        out = np.empty(self.num_classes, dtype=np.int64)
        for members in self.groups:
            out[list(members)] = np.arange(len(members))
        return out

    def to_local(self, labels: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Map global labels to ``(group, local)`` arrays."""
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels out of range [0, {self.num_classes}): "
                             f"{labels.min()}..{labels.max()}")
        return self.class_to_group[labels], self.class_to_local[labels]

    def to_global(self, group: np.ndarray | list[int], local: np.ndarray | list[int]) -> np.ndarray:
        """Map ``(group, local)`` pairs back to global labels."""
        group = np.asarray(group, dtype=np.int64)
        local = np.asarray(local, dtype=np.int64)
        return np.array([self.groups[g][loc] for g, loc in zip(group.ravel(), local.ravel())],
                        dtype=np.int64).reshape(group.shape)


def _validate(groups: tuple[tuple[int, ...], ...], num_classes: int, source: str) -> None:
    if num_classes <= 0 or not groups:
        raise GroupFileError(f"{source}: need num_classes > 0 and at least one group")
    seen: dict[int, int] = {}
    for g, members in enumerate(groups):
        if not members:
            raise GroupFileError(f"{source}: group {g} is empty; remove it or move classes into it")
        for c in members:
            if not 0 <= c < num_classes:
                raise GroupFileError(f"{source}: class {c} in group {g} is outside "
                                     f"[0, {num_classes})")
            if c in seen:
                raise GroupFileError(f"{source}: class {c} is in group {seen[c]} and group {g}; "
                                     "keep it in one")
            seen[c] = g
    missing = sorted(set(range(num_classes)) - set(seen))
    if missing:
        raise GroupFileError(f"{source}: classes {missing[:10]} are in no group; every class needs "
                             "exactly one")


def _from_tstl(d: dict, source: str) -> ClassGroups:
    for key in ("class_to_head", "head_to_classes", "head_to_local", "num_heads", "num_classes"):
        if key not in d:
            raise GroupFileError(f"{source}: TSTL class_grouping.json lacks '{key}'")
    num_heads, num_classes = int(d["num_heads"]), int(d["num_classes"])
    if sorted(int(h) for h in d["head_to_classes"]) != list(range(num_heads)):
        raise GroupFileError(f"{source}: head_to_classes keys must be 0..{num_heads - 1}")
    groups = tuple(tuple(int(c) for c in d["head_to_classes"][str(h)]) for h in range(num_heads))
    _validate(groups, num_classes, source)
    c2h = {int(c): int(h) for c, h in d["class_to_head"].items()}
    for g, members in enumerate(groups):
        for local, c in enumerate(members):
            if c2h.get(c) != g:
                raise GroupFileError(f"{source}: class_to_head[{c}]={c2h.get(c)} but "
                                     f"head_to_classes puts it in {g}")
            got = d["head_to_local"].get(str(g), {}).get(str(c))
            if got != local:
                raise GroupFileError(f"{source}: head_to_local[{g}][{c}]={got}, expected {local} "
                                     "(list position)")
    if len(c2h) != num_classes:
        raise GroupFileError(f"{source}: class_to_head has {len(c2h)} entries, "
                             f"num_classes is {num_classes}")
    return ClassGroups(groups, num_classes)


def load_groups(path: str | os.PathLike) -> ClassGroups:
    """Load and validate a group file in either format (detected from its keys)."""
    source = os.fspath(path)
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise GroupFileError(f"{source}: cannot read group file ({e})") from e
    if not isinstance(d, dict):
        raise GroupFileError(f"{source}: expected a JSON object")
    if "class_to_head" in d:
        return _from_tstl(d, source)
    if d.get("format") != OUR_FORMAT:
        raise GroupFileError(f"{source}: neither TSTL class_grouping.json nor '{OUR_FORMAT}' "
                             "(missing 'format' key)")
    groups = tuple(tuple(int(c) for c in g) for g in d["groups"])
    _validate(groups, int(d["num_classes"]), source)
    return ClassGroups(groups, int(d["num_classes"]))


def save_groups(groups: ClassGroups, path: str | os.PathLike, fmt: str = "ours") -> None:
    """Write ``groups`` as ``fmt`` = ``"ours"`` or ``"tstl"`` (TSTL class_grouping.json)."""
    if fmt == "ours":
        d: dict = {"format": OUR_FORMAT, "num_classes": groups.num_classes,
                   "groups": [list(g) for g in groups.groups]}
    elif fmt == "tstl":
        d = {
            "class_to_head": {str(c): g for g, m in enumerate(groups.groups) for c in m},
            "head_to_classes": {str(g): list(m) for g, m in enumerate(groups.groups)},
            "head_to_local": {str(g): {str(c): i for i, c in enumerate(m)}
                              for g, m in enumerate(groups.groups)},
            "num_heads": groups.num_groups,
            "num_classes": groups.num_classes,
        }
    else:
        raise ValueError(f"unknown group format {fmt!r}; use 'ours' or 'tstl'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(d, indent=1))
    os.replace(tmp, path)
