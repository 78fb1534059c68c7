"""DeepSpeed training and multi-view evaluation: ``python -m tstl.train.cli {train,eval,report}``."""

from tstl import _torchvision_shim

_torchvision_shim.install()
