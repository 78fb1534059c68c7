"""Name -> builder registry for model variants (the timm pattern, kept separate from timm's own namespace)."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a variant builder under its function name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model '{fn.__name__}' is registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered variant ``name``; keyword arguments override its architecture defaults."""
    try:
        builder = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model '{name}'; registered: {', '.join(list_models())}") from None
    return builder(**kwargs)
