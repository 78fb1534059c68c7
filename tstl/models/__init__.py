"""Model families (B-CAST, TimeSformer), the model registry and checkpoint loading.

``create_model(name, **kwargs)`` builds any registered variant; ``load_checkpoint(model, path)`` loads every
supported checkpoint format into it. Importing this package registers all families.
"""

from tstl.core import torchvision_shim

torchvision_shim.install()

from tstl.models.registry import create_model, list_models, register_model  # noqa: E402
from tstl.models.checkpoint import LoadReport, load_checkpoint  # noqa: E402

# Model families register their variants on import.
from tstl.models import bcast as _bcast  # noqa: E402,F401
from tstl.models import timesformer as _timesformer  # noqa: E402,F401

__all__ = ["create_model", "list_models", "register_model", "load_checkpoint", "LoadReport"]
