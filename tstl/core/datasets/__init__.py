"""The dataset registry: one module per dataset, each holding one ``Dataset`` (see ``base.py``).

Adding a dataset = one module here (registered in ``_MODULES``) + one ``configs/data/<name>.yaml``;
prepare, shards, both CLIs and ``make prepare-<name>`` / ``make shards DATASET=<name>`` pick it up
(docs/pipeline.md, "Adding a dataset"). Cheap to import: standard library only.
"""

from __future__ import annotations

from tstl.core.datasets import ek100, kinetics400, ssv2, ucf101
from tstl.core.datasets.base import (
    SPACE_CSV,
    CsvFormat,
    Dataset,
    Entry,
    Label,
    Listing,
    MetadataError,
    unsafe_id_reason,
)

_MODULES = (ssv2, ucf101, kinetics400, ek100)
DATASETS: dict[str, Dataset] = {m.DATASET.name: m.DATASET for m in _MODULES}

__all__ = ["DATASETS", "SPACE_CSV", "CsvFormat", "Dataset", "Entry", "Label", "Listing",
           "MetadataError", "csv_format", "get_dataset", "names", "unsafe_id_reason"]


def names() -> list[str]:
    """The registered dataset names, in registration order."""
    return list(DATASETS)


def get_dataset(name: str) -> Dataset:
    """The registered dataset ``name``; the error lists the registered names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset '{name}'; registered datasets: {', '.join(DATASETS)} "
                         "(tstl/core/datasets/, docs/pipeline.md 'Adding a dataset')") from None


def csv_format(name: str) -> CsvFormat:
    """The annotation CSV format of dataset ``name``; ``<path> <label>`` for a folder that is not
    registered."""
    ds = DATASETS.get(name)
    return ds.csv_format if ds else SPACE_CSV
