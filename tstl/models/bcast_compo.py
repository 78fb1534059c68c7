"""Compositional B-CAST: B-CAST's two streams with a noun head on the spatial (CLIP) feature and a
verb head on the temporal (VideoMAE) feature, for EPIC-KITCHENS-100's verb + noun = action labels.

Reference: KHU-VLL/CAST ``models/bidir_modeling_crossattn.py``
(``compo_bidir_vit_base_patch16_224``: ``composition=True``, lines 447-451, 464-468, 549-556),
trained by ``run_bidirection_compo.py`` and ``engine_for_compomodel.py``. As there: no last
adapters, ``head_noun`` = Linear(D, 300) after its own dropout on the pooled CLIP feature,
``head_verb`` = Linear(D, 97) on the pooled VideoMAE feature, both initialised truncated-normal
(std 0.02) times ``init_scale``; parameter names are CAST's, so its EK100 checkpoints load without
mapping.

Deliberate deviations: ``forward`` returns a dict ``{"verb": [B, 97], "noun": [B, 300]}`` (the
shard set's head names) instead of the tuple ``(noun, verb)``, and the head sizes come from
``num_classes`` (the shard set's heads) where CAST hard-codes 300 and 97 and ignores
``--nb_classes``; everything else is B-CAST's (``bcast.py``: the same deviations).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
from timm.models.vision_transformer import init_weights_vit_timm

from tstl.models.bcast import BCAST
from tstl.models.contract import Conversion
from tstl.models.layers import build_variant
from tstl.models.registry import register_model

HEADS = ("verb", "noun")
"""The heads by their shard-set names; the noun reads the CLIP stream, the verb the VideoMAE one."""
EK100_CLASSES = {"verb": 97, "noun": 300}


class BCASTCompo(BCAST):
    """Compositional B-CAST. Input ``[B, 3, T, H, W]`` (normalised); output ``{"verb": [B, V],
    "noun": [B, N]}`` with ``num_classes = {"verb": V, "noun": N}``."""

    multi_head = True
    head = None
    """No single classifier (B-CAST's conversion of a VideoMAE checkpoint then drops its head)."""

    def _build_head(self, num_classes: Mapping[str, int],  # type: ignore[override]
                    adapter_ratio: float, head_drop_rate: float) -> None:
        """CAST ``bidir_modeling_crossattn.py:447-451``: a dropout and a linear head per stream."""
        classes = dict(num_classes) if isinstance(num_classes, Mapping) else {}
        if set(classes) != set(HEADS) or min(classes.values()) < 1:
            raise ValueError(f"the compositional B-CAST has a verb and a noun head: num_classes "
                             f"must be {{'verb': V, 'noun': N}} with V, N >= 1, got {num_classes}")
        self.num_classes = {h: int(classes[h]) for h in HEADS}
        self.head_verb = nn.Linear(self.embed_dim, self.num_classes["verb"])
        self.head_verb_dropout = nn.Dropout(head_drop_rate)
        self.head_noun = nn.Linear(self.embed_dim, self.num_classes["noun"])
        self.head_noun_dropout = nn.Dropout(head_drop_rate)

    def _init_head(self, init_scale: float) -> None:
        """CAST ``bidir_modeling_crossattn.py:464-468``: both heads times ``init_scale``."""
        with torch.no_grad():
            for head in (self.head_verb, self.head_noun):
                head.weight.mul_(init_scale)
                head.bias.mul_(init_scale)

    def forward_head(self, feats: tuple[torch.Tensor, torch.Tensor]  # type: ignore[override]
                     ) -> dict[str, torch.Tensor]:
        """CAST ``bidir_modeling_crossattn.py:549-556``: noun from the spatial feature, verb from
        the temporal one."""
        s, t = feats
        return {"verb": self.head_verb(self.head_verb_dropout(t)),
                "noun": self.head_noun(self.head_noun_dropout(s))}

    def get_classifier(self) -> nn.ModuleDict:
        return nn.ModuleDict({"verb": self.head_verb, "noun": self.head_noun})

    def reset_classifier(self, num_classes: Mapping[str, int]) -> None:  # type: ignore[override]
        """New verb and noun heads of ``num_classes`` (head -> classes), initialised as the
        constructor's, trainable, on the old heads' device and dtype."""
        if set(num_classes) != set(HEADS):
            raise ValueError(f"num_classes must map verb and noun to classes, got {num_classes}")
        kw = {"device": self.head_verb.weight.device, "dtype": self.head_verb.weight.dtype}
        self.num_classes = {h: int(num_classes[h]) for h in HEADS}
        for h in HEADS:
            head = nn.Linear(self.embed_dim, self.num_classes[h], **kw)
            init_weights_vit_timm(head, needs_reset=False)
            setattr(self, f"head_{h}", head)
        self._init_head(self.init_scale)

    def convert_checkpoint(self, state_dict: dict[str, torch.Tensor]) -> Conversion:
        """B-CAST's conversion; a VideoMAE classifier is dropped (this model has no single head)."""
        conv = super().convert_checkpoint(state_dict)
        for k in [k for k in conv.explained_unexpected if k.split(".")[-2:-1] == ["head"]]:
            conv.explained_unexpected[k] = ("the compositional model has no single head: the "
                                            "classifier is not used")
        return conv


def _build(defaults: dict, **kwargs) -> BCASTCompo:
    return build_variant(BCASTCompo, "compositional B-CAST", defaults, **kwargs)


@register_model
def bcast_compo_vit_b16(**kwargs) -> BCASTCompo:
    """CAST's ``compo_bidir_vit_base_patch16_224``: CLIP ViT-B/16 + VideoMAE ViT-B, 16 frames at
    224 px, 97 verbs and 300 nouns (EPIC-KITCHENS-100)."""
    return _build(dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                       num_frames=16, num_classes=EK100_CLASSES), **kwargs)


@register_model
def bcast_compo_test(**kwargs) -> BCASTCompo:
    """Tiny compositional B-CAST for tests and CPU demos: 32 px, 4 frames, width 64, depth 2."""
    return _build(dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_frames=4,
                       num_classes={"verb": 6, "noun": 5}), **kwargs)
