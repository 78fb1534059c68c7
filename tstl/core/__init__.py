"""The base layer: what every other package may use and which uses none of them.

Logging set-up, the typed config loader, the ffmpeg binary, the torchvision shim, the environment
check and the on-disk formats shared between producers and consumers (shard sets, class-group
files). Importing this package is cheap (no torch); see docs/architecture.md for the layers.
"""
