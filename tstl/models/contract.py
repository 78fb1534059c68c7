"""The model contract: what every registered video classifier implements and what callers may
rely on.

Every builder registered with ``tstl.models.register_model`` returns a ``VideoClassifier``
(``create_model`` checks it). Callers (trainer, optimizer set-up, checkpoint loading, TSTL) use only
the members below and never probe a model with ``hasattr``. ``tests/models/test_registry.py`` holds
every registered model to this contract.

Attributes:
    num_classes: outputs of the classifier (0: no head, ``forward`` returns the features); for a
        multi-head model (``multi_head``) a dict head name -> classes.
    multi_head: the model has several heads (CAST's compositional model: verb and noun): ``forward``
        and ``forward_head`` return a dict head name -> logits ``[B, classes]``, ``get_classifier``
        an ``nn.ModuleDict`` of the heads and ``reset_classifier`` takes a dict; the trainer sums
        the heads' losses and the evaluation reports each head and their combination.
    num_frames: clip length the model is built for
        (``[B, 3, num_frames, img_size, img_size]`` input).
    img_size: frame side in pixels the model is built for.
    grad_checkpointing: whether ``forward_features`` recomputes its blocks in the backward pass.

Methods every family implements (abstract here):
    forward_features(x): the pooled features the head reads (a tensor or a tuple of
        tensors; family-specific).
    forward_head(feats): logits ``[B, num_classes]`` from ``forward_features``'s output.
    get_classifier(): the head module (``nn.Linear``, or ``nn.Identity`` when ``num_classes == 0``).
    reset_classifier(num_classes): replace the head by a new one with ``num_classes`` outputs,
        initialised as the family's constructor initialises it, on the old head's device and dtype;
        it trains (``requires_grad``).
    no_weight_decay(): names of parameters excluded from weight decay (besides biases and norms,
        which the optimizer excludes by shape); every name is a real parameter.
    group_matcher(coarse=False): timm's layer-group spec
        (``{"stem": regex, "blocks": [(regex, None), ...]}``), read by timm's ``group_parameters``
        for layer-wise lr decay (``tstl.train.engine.layer_ids``, the ids of
        ``timm.optim.param_groups_layer_decay``): CAST's rule, so no ``(99999,)`` merge entries.
    convert_checkpoint(state_dict): map a foreign checkpoint layout onto this model's key
        names (``Conversion``).

Methods implemented here, once for every family:
    forward(x): ``forward_head(forward_features(x))``.
    trainable_state_dict(): the parameters with ``requires_grad`` (detached), what a TSTL expert
        file stores.
    load_trainable_state_dict(sd, strict=True): load such a dict; strict: its keys must equal
        ``trainable_state_dict()``'s, non-strict: the given trainable keys load, the rest
        are reported.
    set_grad_checkpointing(enable): toggle activation checkpointing.

A frozen parameter (``requires_grad=False``) gets no gradient and no optimizer state; which
parameters a family freezes is its own rule (B-CAST: the CLIP and VideoMAE experts;
TimeSformer: none).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn as nn


@dataclass
class Conversion:
    """A checkpoint mapped onto a model's key layout.

    Attributes:
        state_dict: tensors under the model's own names.
        format: human-readable name of the detected layout (e.g.
            ``"openai-clip"``, ``"videomae-pretrain"``).
        explained_missing: model keys the checkpoint is known not to provide, with the reason
            (e.g. ``{"head.weight": "classes differ: head re-initialised"}``); prefixes ending in
            ``.`` match every key below them.
        explained_unexpected: checkpoint keys dropped on purpose, with the reason (e.g. the
            MAE decoder).
    """

    state_dict: dict[str, torch.Tensor]
    format: str
    explained_missing: dict[str, str] = field(default_factory=dict)
    explained_unexpected: dict[str, str] = field(default_factory=dict)


class TrainableKeys(NamedTuple):
    """What ``load_trainable_state_dict(strict=False)`` did not load."""

    missing: list[str]
    unexpected: list[str]


class VideoClassifier(nn.Module, metaclass=abc.ABCMeta):
    """Base class of every registered video model; see the module docstring for the contract."""

    num_classes: int | dict[str, int]
    num_frames: int
    img_size: int
    grad_checkpointing: bool = False
    multi_head: ClassVar[bool] = False

    # ------------------------------------------------------------------- family-specific (abstract)

    @abc.abstractmethod
    def forward_features(self, x: torch.Tensor) -> Any:
        """Pooled features of a clip ``[B, 3, T, H, W]``, what ``forward_head`` reads."""

    @abc.abstractmethod
    def forward_head(self, feats: Any) -> torch.Tensor:
        """Logits ``[B, num_classes]`` from ``forward_features``'s output."""

    @abc.abstractmethod
    def get_classifier(self) -> nn.Module:
        """The head module."""

    @abc.abstractmethod
    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a freshly initialised one with ``num_classes`` outputs (0:
        no head)."""

    @abc.abstractmethod
    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay."""

    @abc.abstractmethod
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm layer-group spec for layer-wise lr decay."""

    @abc.abstractmethod
    def convert_checkpoint(self, state_dict: dict[str, torch.Tensor]) -> Conversion:
        """Map a checkpoint's state dict onto this model's names; raise ``ValueError`` for an
        unknown layout."""

    # ------------------------------------------------------------------- shared implementation

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        return self.forward_head(self.forward_features(x))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of keeping its activations
        (same gradients)."""
        self.grad_checkpointing = enable

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained parameters (``requires_grad``), detached."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state_dict: Mapping[str, torch.Tensor],
                                  strict: bool = True) -> TrainableKeys:
        """Load a ``trainable_state_dict()``.

        Args:
            state_dict: tensors under trainable parameter names.
            strict: the keys must equal ``trainable_state_dict()``'s; otherwise the trainable keys
                present load and the others are returned.

        Raises:
            ValueError: strict and the keys differ, or a tensor's shape differs from
                its parameter's.
        """
        own = dict(self.named_parameters())
        expected = {n for n, p in own.items() if p.requires_grad}
        missing = sorted(expected - set(state_dict))
        unexpected = sorted(set(state_dict) - expected)
        if strict and (missing or unexpected):
            frozen = [k for k in unexpected if k in own]
            raise ValueError(
                f"{type(self).__name__}.load_trainable_state_dict: keys differ from "
                f"trainable_state_dict(): missing {missing[:8]}, unexpected {unexpected[:8]}"
                + (f" (frozen here: {frozen[:4]})" if frozen else "")
                + "; pass strict=False to load the common keys")
        shapes = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
                  if k in expected and v.shape != own[k].shape]
        if shapes:
            raise ValueError(f"{type(self).__name__}.load_trainable_state_dict: shape mismatch: "
                             + "; ".join(shapes))
        with torch.no_grad():
            for k, v in state_dict.items():
                if k in expected:
                    own[k].copy_(v)
        return TrainableKeys(missing, unexpected)
