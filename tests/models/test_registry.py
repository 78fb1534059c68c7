"""Every registered model keeps the model contract (tstl/models/contract.py), in the spirit of
timm's tests/test_models.py. New registrations are picked up automatically through
``list_models()``; multi-head models (``multi_head``: a dict of logits per head) are held to the
same checks per head.

Full-size variants are built on the meta device (no memory, no compute) for the contract and
parameter counts; the forward/backward runs on a reduced build of the same family and attention type
(``_reduced``).
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
import torch.nn as nn
from timm.optim import param_groups_layer_decay

from tstl.models import VideoClassifier, create_model, list_models

MODELS = list_models()

# Published/known parameter counts (total, trainable) at the variant's default classes; see
# docs/models.md.
PARAMS = {
    "bcast_vit_b16": (172_023_552 + 45_071_232 + 769 * 400, 45_071_232 + 769 * 400),
    "bcast_compo_vit_b16": (216_808_333, 44_784_781),  # models-cast-tstl.md 2.2, compo EPIC
    "timesformer_vit_b16": (121_566_352, 121_566_352),
    "timesformer_hr_vit_b16": (122_024_080, 122_024_080),
    "timesformer_l_vit_b16": (121_633_936, 121_633_936),
}
# A model with more parameters than this is built at full size only on the meta device.
SMALL = 2_000_000
# Architecture overrides for a CPU forward/backward of a full-size variant: same family, same
# attention type.
REDUCED = dict(depth=1, img_size=32, patch_size=8, embed_dim=64, num_heads=4, num_frames=4)


def _meta(name: str, **kwargs) -> VideoClassifier:
    with torch.device("meta"):
        return create_model(name, **kwargs)


def _n_params(model: nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in model.parameters()
               if trainable is None or p.requires_grad == trainable)


@functools.cache
def _full_size(name: str) -> tuple[type, str | None, int]:
    """Class, attention type and parameter count of the variant at full size (built once, on the
    meta device)."""
    full = _meta(name)
    return type(full), getattr(full, "attention_type", None), _n_params(full)


def _reduced(name: str) -> VideoClassifier:
    """The variant itself when small, else the variant with ``REDUCED`` overrides its class
    accepts."""
    cls, attention_type, n_params = _full_size(name)
    torch.manual_seed(0)
    if n_params <= SMALL:
        return create_model(name)
    accepted = inspect.signature(cls).parameters
    model = create_model(name, **{k: v for k, v in REDUCED.items() if k in accepted})
    assert type(model) is cls and getattr(model, "attention_type", None) == attention_type
    return model


def _heads(model: VideoClassifier) -> dict[str, int]:
    """Classes per output: ``{"": n}`` for a one-head model."""
    return dict(model.num_classes) if model.multi_head else {"": model.num_classes}


def _outputs(out) -> dict[str, torch.Tensor]:
    return out if isinstance(out, dict) else {"": out}


def _classes(model: VideoClassifier, n: int):
    """``n`` classes for every head, in the form the model's ``reset_classifier`` takes."""
    return {h: n + i for i, h in enumerate(model.num_classes)} if model.multi_head else n


def _linears(head: nn.Module) -> dict[str, nn.Linear]:
    return dict(head.items()) if isinstance(head, nn.ModuleDict) else {"": head}


def _check_logits(model: VideoClassifier, out, batch: int) -> None:
    got = _outputs(out)
    assert set(got) == set(_heads(model))
    for h, n in _heads(model).items():
        assert got[h].shape == (batch, n), (h, got[h].shape)


def _clip(model: VideoClassifier, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, model.num_frames, model.img_size, model.img_size, generator=g)


def test_registry_is_not_empty() -> None:
    assert {"bcast_vit_b16", "bcast_test", "timesformer_vit_b16", "timesformer_test",
            "bcast_compo_vit_b16", "bcast_compo_test"} <= set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_contract_at_full_size(name: str) -> None:
    model = _meta(name)
    assert isinstance(model, VideoClassifier)
    assert min(_heads(model).values()) > 0 and model.num_frames > 0 and model.img_size > 0
    names = {n for n, _ in model.named_parameters()}
    trainable = model.trainable_state_dict()
    assert (trainable
            and set(trainable) == {n for n, p in model.named_parameters() if p.requires_grad})
    total = _n_params(model)
    if name in PARAMS:
        assert (total, _n_params(model, True)) == PARAMS[name]
    assert model.no_weight_decay() <= names, (
        "no_weight_decay() names parameters the model does not have")
    x = torch.empty(1, 3, model.num_frames, model.img_size, model.img_size, device="meta")
    head = _linears(model.get_classifier())
    assert {h: lin.out_features for h, lin in head.items()} == _heads(model)
    assert all(isinstance(lin, nn.Linear) for lin in head.values())
    assert all(p.requires_grad for lin in head.values() for p in lin.parameters())
    with torch.no_grad():
        _check_logits(model, model(x), 1)
    model.reset_classifier(_classes(model, 7))
    assert model.num_classes == _classes(model, 7)
    new = _linears(model.get_classifier())
    for h, lin in new.items():
        assert lin is not head[h] and lin.out_features == _heads(model)[h]
        assert lin.weight.device.type == "meta" and all(p.requires_grad for p in lin.parameters())
    with torch.no_grad():
        _check_logits(model, model(x), 1)


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward(name: str) -> None:
    model = _reduced(name).train()
    x = _clip(model)
    out = _outputs(model(x))
    _check_logits(model, out, 2)
    assert all(torch.isfinite(o).all() for o in out.values())
    # Non-zero loss through every path: the zero-initialised layers of B-CAST still get gradients.
    sum((o.float() ** 2).sum() + o.sum() for o in out.values()).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{n}: trainable but got no gradient"
            assert torch.isfinite(p.grad).all(), f"{n}: non-finite gradient"
        else:
            assert p.grad is None, f"{n}: frozen but got a gradient"


@pytest.mark.parametrize("name", MODELS)
def test_features_head_split_and_classifier_reset(name: str) -> None:
    model = _reduced(name).eval()
    x = _clip(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x)),
                                   rtol=0, atol=0)
        model.reset_classifier(_classes(model, 3))
        _check_logits(model, model(x), 2)
        assert model.num_classes == _classes(model, 3)
        heads = _linears(model.get_classifier())
        assert {h: lin.out_features for h, lin in heads.items()} == _heads(model)


@pytest.mark.parametrize("name", MODELS)
def test_trainable_state_round_trip(name: str) -> None:
    src, dst = _reduced(name), _reduced(name)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    sd = src.trainable_state_dict()
    assert dst.load_trainable_state_dict(sd) == ([], [])
    for k, v in dst.trainable_state_dict().items():
        assert torch.equal(v, sd[k]), k
    key = next(iter(sd))
    partial = {k: v for k, v in sd.items() if k != key}
    with pytest.raises(ValueError, match="missing"):
        dst.load_trainable_state_dict(partial)
    assert dst.load_trainable_state_dict(partial, strict=False).missing == [key]
    with pytest.raises(ValueError, match="unexpected"):
        dst.load_trainable_state_dict({**sd, "no.such.weight": torch.zeros(1)})
    frozen = [n for n, p in dst.named_parameters() if not p.requires_grad]
    if frozen:
        with pytest.raises(ValueError, match="frozen"):
            dst.load_trainable_state_dict(
                {**sd, frozen[0]: dict(dst.named_parameters())[frozen[0]].detach()})
    with pytest.raises(ValueError, match="shape"):
        dst.load_trainable_state_dict({**sd, key: torch.zeros(1, 2, 3, 4, 5)})


@pytest.mark.parametrize("name", MODELS)
def test_optimizer_groups(name: str) -> None:
    model = _reduced(name)
    groups = param_groups_layer_decay(model, 0.05, model.no_weight_decay(), layer_decay=0.75)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}
    params = dict(model.named_parameters())
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert {id(params[n]) for n in model.no_weight_decay() if params[n].requires_grad} <= no_decay
    scales = sorted({g["lr_scale"] for g in groups})
    assert scales[-1] == 1.0 and len(scales) > 1


@pytest.mark.parametrize("name", MODELS)
def test_grad_checkpointing_same_gradients(name: str) -> None:
    # eval: no dropout or drop path, so both passes are the same function
    model = _reduced(name).eval()
    x = _clip(model)
    sum(o.sum() for o in _outputs(model(x)).values()).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    sum(o.sum() for o in _outputs(model(x)).values()).backward()
    for n, g in ref.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-5, atol=1e-6)
