"""Model families (B-CAST, its compositional variant, TimeSformer), the model contract, the registry
and checkpoint loading.

``create_model(name, **kwargs)`` builds any registered variant, a ``VideoClassifier`` (the contract
every family keeps, ``tstl.models.contract``); ``load_checkpoint(model, path)`` loads every
supported checkpoint format into it. Importing this package registers all families.
"""

from tstl.core import torchvision_shim

torchvision_shim.install()

# The families (bcast, bcast_compo, timesformer) register their variants on import.
from tstl.models import bcast as _bcast  # noqa: E402,F401
from tstl.models import bcast_compo as _bcast_compo  # noqa: E402,F401
from tstl.models import timesformer as _timesformer  # noqa: E402,F401
from tstl.models.checkpoint import (  # noqa: E402
    LoadReport,
    UntrustedCheckpointError,
    load_checkpoint,
)
from tstl.models.contract import Conversion, VideoClassifier  # noqa: E402
from tstl.models.registry import create_model, list_models, register_model  # noqa: E402

__all__ = ["Conversion", "LoadReport", "UntrustedCheckpointError", "VideoClassifier",
           "create_model", "list_models", "load_checkpoint", "register_model"]
