"""Name -> builder registry for model variants (the timm pattern, kept separate from timm's
own namespace).

Every registered builder returns a ``VideoClassifier`` (``tstl.models.contract``);
``create_model`` checks it.
"""

from __future__ import annotations

from collections.abc import Callable

from tstl.models.contract import VideoClassifier

_REGISTRY: dict[str, Callable[..., VideoClassifier]] = {}


def register_model(fn: Callable[..., VideoClassifier]) -> Callable[..., VideoClassifier]:
    """Decorator: register a variant builder under its function name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model '{fn.__name__}' is registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> VideoClassifier:
    """Build the registered variant ``name``; keyword arguments override its
    architecture defaults."""
    try:
        builder = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model '{name}'; registered: {', '.join(list_models())}") from None
    model = builder(**kwargs)
    if not isinstance(model, VideoClassifier):
        raise TypeError(f"model '{name}' ({builder.__module__}.{builder.__qualname__}) returned a "
                        f"{type(model).__name__}, not a tstl.models.contract.VideoClassifier")
    return model
