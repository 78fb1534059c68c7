"""Benchmarks run by ``make bench``; each writes its own section of docs/benchmarks.md
(``benchmarks.report``).

Not part of the installed packages: they import the library, never the other way round.
"""

from tstl.core import torchvision_shim

# Benchmark modules import timm (hence torchvision) directly, before any tstl package that would
# install the shim.
torchvision_shim.install()
