"""TSTL: streaming video loader, models (B-CAST, TSTL, TimeSformer) and DeepSpeed trainer.

Importing ``tstl`` itself is cheap (no torch); subpackages pull in what they need.
"""

__version__ = "0.2.0"
