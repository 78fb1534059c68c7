"""TSTL test fixtures: random-weight checkpoints to start stages from (production TSTL needs a real
init)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tstl.models import create_model


def write_random_checkpoint(path: Path, model_name: str, num_classes: int, seed: int = 0,
                            **kwargs) -> Path:
    """A checkpoint of ``create_model``'s random weights after ``torch.manual_seed(seed)``, in
    CAST's layout, with a head over every class (so experts can take their group's rows of it, as
    from a trained CAST)."""
    torch.manual_seed(seed)
    model = create_model(model_name, num_classes=num_classes, **kwargs)
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture
def random_init(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``random_init(model_name="bcast_test", num_classes=4, seed=0) -> path`` under
    ``tmp_path``."""

    def make(model_name: str = "bcast_test", num_classes: int = 4, seed: int = 0, **kwargs) -> Path:
        return write_random_checkpoint(tmp_path / f"init-{model_name}-{num_classes}-{seed}.pt",
                                       model_name, num_classes, seed, **kwargs)

    return make
