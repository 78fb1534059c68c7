"""Make timm importable next to a CPU-only torch.

PyPI's only torchvision matching torch 2.13 is a CUDA build. Against a CPU torch its C++ ops fail to
load and ``import torchvision`` then dies in ``torchvision/_meta_registrations.py``
(``operator torchvision::nms does not exist``) because that module registers fake kernels for ops
that were never loaded. timm imports torchvision at import time, so without this nothing that uses
timm would import on a CPU machine.

The fix is to pre-register an empty module under that name, only when torch itself has no CUDA. We
lose the fake (meta) kernels of torchvision's detection ops, which this project never uses. With a
CUDA torch (any GPU machine) nothing is changed.
"""

from __future__ import annotations

import sys
import types

_NAME = "torchvision._meta_registrations"


def install() -> None:
    """Register the empty meta-registration module if torch is a CPU build. Idempotent."""
    if "torchvision" in sys.modules or _NAME in sys.modules:
        return
    import torch

    if torch.version.cuda is None:
        sys.modules[_NAME] = types.ModuleType(_NAME)
