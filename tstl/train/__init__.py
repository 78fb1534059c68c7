"""DeepSpeed training and multi-view evaluation:
``python -m tstl.train.cli {train,eval,report}``."""

from tstl.core import torchvision_shim

torchvision_shim.install()
