"""Layer-wise lr decay is timm's (``group_parameters`` on the models' matchers) with CAST's layer
ids; the CAST table itself is checked in tests/test_recipes.py."""

from __future__ import annotations

import pytest
import torch
from timm.optim import param_groups_layer_decay

from tstl.models import create_model
from tstl.train.config import OptimConfig
from tstl.train.engine import layer_ids, param_groups


@pytest.mark.parametrize("name", ["bcast_test", "timesformer_test", "bcast_vit_b16"])
def test_each_parameter_gets_the_lr_scale_and_decay_timm_gives_it(name: str) -> None:
    with torch.device("meta"):  # names and shapes only
        model = create_model(name, num_classes=7)
    ours = param_groups(model, OptimConfig(layer_decay=0.75, weight_decay=0.05))
    theirs = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75,
                                      no_weight_decay_list=model.no_weight_decay())
    mine = {id(p): (g["lr_scale"], g["weight_decay"]) for g in ours for p in g["params"]}
    timm = {id(p): (g["lr_scale"], g["weight_decay"]) for g in theirs for p in g["params"]}
    assert mine == timm and len(mine) == sum(p.requires_grad for p in model.parameters())
    # the groups stay in (layer, no_decay) order: saved optimizer states are laid out that way
    keys = [(g["lr_scale"], g["weight_decay"] == 0.0) for g in ours]
    assert keys == sorted(keys)


def test_final_norm_and_head_share_the_top_id_as_in_cast() -> None:
    model = create_model("timesformer_test", num_classes=5)
    ids, n = layer_ids(model)
    depth = len(model.blocks)
    assert n == depth + 2 and ids["pos_embed"] == 0 and ids["blocks.0.attn.qkv.weight"] == 1
    assert ids["norm.weight"] == ids["head.weight"] == depth + 1  # timm's ViT: norm with the block
