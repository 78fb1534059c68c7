"""Trainer units: schedule, parameter groups, DeepSpeed config, config errors, evaluation merge."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tstl.core.config import ConfigError, load_config
from tstl.models import create_model
from tstl.train.config import EngineConfig, OptimConfig, TrainConfig
from tstl.train.ds_config import BatchPlan, deepspeed_config
from tstl.train.engine import lr_factor, param_groups
from tstl.train.evaluate import merge, metrics

ROOT = Path(__file__).resolve().parents[2]


def test_schedule_warms_up_from_zero_then_cosine_to_min() -> None:
    kw = dict(lr=1.0, min_lr=0.01, warmup_steps=5, total_steps=25)
    assert [lr_factor(s, **kw) for s in range(5)] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert lr_factor(5, **kw) == pytest.approx(1.0)
    assert lr_factor(15, **kw) == pytest.approx(0.01 + 0.5 * 0.99 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(25, **kw) == pytest.approx(0.01) and lr_factor(40, **kw) == pytest.approx(0.01)


def test_batch_plan_scales_the_learning_rate() -> None:
    plan = BatchPlan(micro_batch=6, accum_steps=4, world_size=16)
    assert plan.total == 384 and plan.scaled(1e-3) == pytest.approx(1.5e-3)  # CAST's SSV2 figures


def test_param_groups_hold_only_trainable_parameters_with_layer_decay() -> None:
    model = create_model("bcast_test", num_classes=5)
    groups = param_groups(model, OptimConfig(layer_decay=0.75, weight_decay=0.05))
    ids = {id(p) for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in ids) == p.requires_grad, name
    by_id = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_id[id(named["blocks.0.cross_s_down.weight"])]["lr_scale"] == pytest.approx(0.75**2)
    assert by_id[id(named["blocks.0.cross_s_down.bias"])]["weight_decay"] == 0.0
    assert by_id[id(named["head.weight"])]["weight_decay"] == 0.05


def test_deepspeed_config_follows_ours() -> None:
    plan = BatchPlan(4, 2, 2)
    ds = deepspeed_config(EngineConfig(precision="fp16", zero_stage=1, accum_steps=2), 1.0, plan)
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["zero_optimization"] == {"stage": 1}
    assert (ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0
            and ds["gradient_clipping"] == 1.0)
    ds = deepspeed_config(EngineConfig(precision="bf16"), 0.0, plan)
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds and "gradient_clipping" not in ds


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "unknown key 'optim.lrr' (did you mean 'lr'?)"),
    ("engine.zero_stage=3", "zero_stage must be 0, 1 or 2"),
    ("engine.precision=fp8", "engine.precision: expected one of"),
    ("data.batch_size=3", "even batch_size"),
    ("epochs=many", "epochs: expected an integer"),
])
def test_config_errors_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig,
                    [ROOT / "configs/data/ssv2.yaml", ROOT / "configs/model/bcast_vit_b16.yaml"],
                    [override])
    assert message in str(e.value)


def test_shipped_recipes_load() -> None:
    for files in (["data/ssv2.yaml", "model/bcast_vit_b16.yaml"],
                  ["data/ucf101.yaml", "model/timesformer_vit_b16.yaml"],
                  ["data/ssv2.yaml", "demo.yaml"]):
        cfg = load_config(TrainConfig, [ROOT / "configs" / f for f in files])
        assert cfg.epochs >= 1
    ssv2 = load_config(TrainConfig, [ROOT / "configs/data/ssv2.yaml"])
    assert (ssv2.data.flip is False and ssv2.data.sampling == "segment"
            and tuple(ssv2.data.test_views) == (2, 3))


def test_multi_view_merge_matches_a_hand_computation() -> None:
    p = lambda *v: np.array(v, dtype=np.float32)  # noqa: E731
    rank0 = {("a", 0): (p(0.6, 0.3, 0.1), 0), ("a", 1): (p(0.2, 0.7, 0.1), 0),
             ("b", 0): (p(0.1, 0.1, 0.8), 2)}
    # rank 1 repeats ("a", 1) (loader padding) and holds the other views
    rank1 = {("a", 1): (p(0.2, 0.7, 0.1), 0), ("b", 1): (p(0.3, 0.3, 0.4), 2),
             ("c", 0): (p(0.5, 0.4, 0.1), 1)}
    probs, labels = merge([rank0, rank1])
    np.testing.assert_allclose(probs["a"], [0.4, 0.5, 0.1], rtol=1e-6)  # the duplicate counted once
    np.testing.assert_allclose(probs["b"], [0.2, 0.2, 0.6], rtol=1e-6)
    np.testing.assert_allclose(probs["c"], [0.5, 0.4, 0.1], rtol=1e-6)
    res = metrics(probs, labels, 3)
    # a -> predicted 1 (true 0), b -> 2 (true 2), c -> 0 (true 1)
    assert res.top1 == pytest.approx(1 / 3) and res.videos == 3
    assert res.confusion.tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 1]]
    np.testing.assert_allclose(res.per_class, [0.0, 0.0, 1.0])
    assert res.top5 == 1.0


def test_evaluate_on_one_rank_uses_softmax_of_the_model() -> None:
    from tstl.train.evaluate import predict

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 3))
    batch = {"video": torch.randn(2, 1, 2, 3, 1), "label": torch.tensor([0, 2]), "key": ["x", "y"],
             "view": torch.tensor([0, 0])}
    out = predict(model, [batch], torch.device("cpu"))  # logits; the merge rule applies the softmax
    logits = model(batch["video"]).detach().numpy()
    np.testing.assert_allclose(out[("y", 0)][0], logits[1], rtol=1e-6)
    assert out[("x", 0)][1] == 0
    probs, _ = merge([out], "mean_softmax")
    expected = torch.softmax(model(batch["video"]), -1).detach().numpy()
    np.testing.assert_allclose(probs["y"], expected[1], rtol=1e-5)


def test_engine_deepspeed_is_merged_last_key_by_key() -> None:
    extra = {"zero_optimization": {"overlap_comm": True},
             "flops_profiler": {"enabled": True, "profile_step": 3},
             "csv_monitor": {"enabled": True, "output_path": "runs/x/ds", "job_name": "ds"},
             "steps_per_print": 50}
    ds = deepspeed_config(EngineConfig(zero_stage=1, deepspeed=extra), 0.0, BatchPlan(4, 1, 1))
    assert ds["zero_optimization"] == {"stage": 1, "overlap_comm": True}  # ours kept, theirs added
    assert ds["flops_profiler"] == extra["flops_profiler"] and ds["steps_per_print"] == 50
    assert ds["csv_monitor"]["enabled"] and ds["train_batch_size"] == 4


@pytest.mark.parametrize("override,message", [
    ("engine.deepspeed.train_batch_size=64",
     "engine.deepspeed.train_batch_size is generated from our config: set "
     "data.batch_size and engine.accum_steps instead"),
    ("engine.deepspeed.zero_optimization.stage=2", "set engine.zero_stage instead"),
    ("engine.deepspeed.bf16.enabled=false", "set engine.precision instead"),
    ("engine.deepspeed.gradient_clipping=1.0", "set optim.clip_grad instead"),
    ("engine.deepspeed.flops_profilr.enabled=true",
     "engine.deepspeed.flops_profilr (did you mean 'flops_profiler'?)"),
    ("engine.deepspeed.flops_profiler.enabeld=true", "did you mean 'flops_profiler.enabled'?"),
    ("engine.deepspeed.zero_optimization.overlap_com=true",
     "engine.deepspeed: DeepSpeed rejects the merged config"),
    ("engine.deepspeed.tensorboard.enabled=maybe",
     "engine.deepspeed: DeepSpeed rejects the merged config"),
])
def test_engine_deepspeed_errors_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig,
                    [ROOT / "configs/data/ssv2.yaml", ROOT / "configs/model/bcast_vit_b16.yaml"],
                    [override])
    assert message in str(e.value)


def test_engine_deepspeed_documented_examples_load() -> None:
    cfg = load_config(TrainConfig, [ROOT / "configs/data/ssv2.yaml",
                                    ROOT / "configs/model/bcast_vit_b16.yaml"], [
        "engine.deepspeed.flops_profiler.enabled=true",
        "engine.deepspeed.flops_profiler.profile_step=20",
        "engine.deepspeed.tensorboard.enabled=true",
        "engine.deepspeed.tensorboard.output_path=runs/x/ds",
        "engine.deepspeed.comms_logger.enabled=true",
        "engine.deepspeed.zero_optimization.reduce_bucket_size=50000000"])
    assert cfg.engine.deepspeed["flops_profiler"] == {"enabled": True, "profile_step": 20}
