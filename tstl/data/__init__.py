"""Streaming WebDataset loader: shards -> decode -> frame sampling -> augmentation -> batches.

``build_train_loader`` and ``build_eval_loader`` are the entry points; see ``docs/loader.md``.
"""

from tstl.core import torchvision_shim

torchvision_shim.install()

from tstl.data.config import DataConfig  # noqa: E402
from tstl.data.loader import (  # noqa: E402
    BadSampleRateError,
    ShardLoader,
    build_eval_loader,
    build_train_loader,
)

__all__ = ["BadSampleRateError", "DataConfig", "ShardLoader", "build_eval_loader",
           "build_train_loader"]
