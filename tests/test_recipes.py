"""Every resolved recipe against a table transcribed from its reference, plus the new recipe
mechanics: layering and print-config, the step schedule, the view merge rule, the short-side jitter
geometry and CAST's layer-decay ids.

Learning rates: ours are per 256 clips and scaled by the total batch (micro batch x accumulation x
ranks), as CAST's ``run_bidirection.py:363-367`` does with its ``--lr``, so CAST/TSTL ``--lr``
values compare directly. PySlowFast's ``SOLVER.BASE_LR`` is absolute for its effective batch
(``GLOBAL_BATCH_SIZE`` 64: ``TRAIN.BATCH_SIZE`` 8 over ``NUM_GPUS`` 8, accumulated over 64 // 8
iterations, ``tools/train_net.py:51-52,102-116``): 0.005 x 256 / 64 = 0.02.
"""

from __future__ import annotations

import io
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tstl.core.config import ConfigError, dump_yaml, to_dict
from tstl.data.config import DataConfig
from tstl.data.spatial import (
    JitterCrop,
    jitter_short_side,
    random_crop_offset,
    scaled_size,
    short_side_jitter_crop,
)
from tstl.train.config import OptimConfig
from tstl.train.ds_config import BatchPlan, deepspeed_config
from tstl.train.engine import build_scheduler, param_groups, step_factor
from tstl.train.evaluate import merge, metrics
from tstl.train.recipes import load_recipe, main, print_config, recipe_files

ROOT = Path(__file__).resolve().parents[1]

# Shorthands for the reference files (repository: path).
CAST_SSV2 = "KHU-VLL/CAST scripts/ssv2/ssv2.sh"
CAST_K400 = "KHU-VLL/CAST scripts/kinetics/k400.sh"
CAST_RUN = "KHU-VLL/CAST run_bidirection.py"
TSTL_README = "saddy-paddy/TSTL README.md"
TSF_K400 = "facebookresearch/TimeSformer configs/Kinetics/TimeSformer_divST_8x32_224.yaml"
TSF_HR = "facebookresearch/TimeSformer configs/Kinetics/TimeSformer_divST_16x16_448.yaml"
TSF_L = "facebookresearch/TimeSformer configs/Kinetics/TimeSformer_divST_96x4_224.yaml"
TSF_SSV2 = "facebookresearch/TimeSformer configs/SSv2/TimeSformer_divST_8_224.yaml"
TSF_DEF = "facebookresearch/TimeSformer timesformer/config/defaults.py"

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])

# CAST's B-CAST values shared by its SSV2 and K400 scripts and the TSTL README command.
BCAST_COMMON = {
    "model.name": "bcast_vit_b16",        # CAST run_bidirection.py
                                          # --vmae_model bidir_vit_base_patch16_224
    "optim.name": "adamw",                # ssv2.sh:29 / k400.sh:29 / README.md:94 --opt adamw
    "optim.lr": 1e-3,                     # ssv2.sh:30 / k400.sh:30 / README.md:95 --lr 1e-3
                                          # (per 256, scaled alike)
    "optim.betas": [0.9, 0.999],          # ssv2.sh:31 / k400.sh:31 / README.md:96
                                          # --opt_betas 0.9 0.999
    "optim.weight_decay": 0.05,           # ssv2.sh:32 / k400.sh:32 / README.md:97
                                          # --weight_decay 0.05
    "optim.warmup_epochs": 5.0,           # ssv2.sh:44 / k400.sh:47 / README.md:112
                                          # --warmup_epochs 5
    "optim.min_lr": 1e-6,                 # run_bidirection.py:82 --min_lr default
    "optim.layer_decay": 0.75,            # k400.sh:39 / README.md:104; ssv2.sh omits it:
                                          # run_bidirection.py:78 default
    "optim.schedule": "cosine",           # run_bidirection.py:410-413 utils.cosine_scheduler
    "data.input_size": 224,               # ssv2.sh:24 / k400.sh:24 / README.md:89 --input_size 224
    "data.short_side_scale": 0,           # --short_side_size 224 (= input_size), ssv2.sh:25 /
                                          # k400.sh:25 / README.md:90
    "data.rand_augment": "rand-m7-n4-mstd0.5-inc1",  # run_bidirection.py:95 --aa default
    "data.reprob": 0.0,                   # ssv2.sh:41 / k400.sh:42 / README.md:107 --reprob 0.
    "data.mixup": 0.8,                    # run_bidirection.py:119 --mixup default
    "data.cutmix": 1.0,                   # run_bidirection.py:121 --cutmix default
    "data.mixup_switch_prob": 0.0,        # ssv2.sh:39 / k400.sh:40 / README.md:105
                                          # --mixup_switch_prob 0
    "data.label_smoothing": 0.1,          # run_bidirection.py:97 --smoothing default
    "data.mean": IMAGENET[0],             # run_bidirection.py:151 --imagenet_default_mean_and_std
    "data.std": IMAGENET[1],
    "data.num_frames": 16,                # ssv2.sh:28 / k400.sh:28 / README.md:93 --num_frames 16
    "data.num_workers": 8,                # ssv2.sh:37 / k400.sh:37 / README.md:102 --num_workers 8
    "data.train_crop": "random_resized",  # CAST dataset/*.py
                                          # spatial_sampling(aspect_ratio, scale) -> RRC
    "data.rrc_scale": [0.08, 1.0],        # CAST dataset/ssv2.py, kinetics.py _aug_frame scl
    "test_merge": "mean_softmax",         # CAST engine_for_onemodel.py:249 softmax per view,
                                          # :278 mean
    "seed": 0,                            # ssv2.sh:38 / k400.sh:45 / README.md:110 --seed 0
    # DeepSpeed fp16 loss scaling when engine.precision=fp16 (our default is bf16): CAST
    # util_tools/utils.py:756-761 create_ds_config, the same in TSTL's util_tools/utils.py:767-769
    "engine.fp16_initial_scale_power": 7,  # "initial_scale_power": 7
    "engine.fp16_loss_scale_window": 128,  # "loss_scale_window": 128
    "val_every": 1,                       # run_bidirection.py:477-478 validation after every epoch
}

# TimeSformer's values shared by every variant and dataset (timesformer/config/defaults.py and the
# configs). "*.yaml:N" is line N of the three configs/Kinetics/TimeSformer_divST_*.yaml files;
# configs/SSv2/TimeSformer_divST_8_224.yaml holds the same values 2-3 lines further down (it has
# PATH_PREFIX and the DATA flags).
TSF_COMMON = {
    "epochs": 15,                         # TimeSformer_divST_*.yaml:23 SOLVER.MAX_EPOCH 15
    "optim.name": "sgd",                  # *.yaml:26 OPTIMIZING_METHOD sgd
                                          # (NESTEROV True: defaults.py:382)
    "optim.lr": 0.02,                     # *.yaml:19 BASE_LR 0.005 for a batch of 64 = 0.02 per 256
    "optim.schedule": "steps",            # *.yaml:20 LR_POLICY steps_with_relative_lrs
    "optim.lr_steps": [0.0, 11.0, 14.0],  # *.yaml:21 STEPS [0, 11, 14]
    "optim.lr_factors": [1.0, 0.1, 0.01],  # *.yaml:22 LRS [1, 0.1, 0.01]
    "optim.warmup_epochs": 0.0,           # defaults.py:391 SOLVER.WARMUP_EPOCHS 0.0
    "optim.momentum": 0.9,                # *.yaml:24 MOMENTUM 0.9
    "optim.weight_decay": 1e-4,           # *.yaml:25 WEIGHT_DECAY 1e-4
    "optim.weight_decay_all": True,       # timesformer/models/optimizer.py:29-41: only "bn" names
                                          # are exempt
    "optim.layer_decay": 1.0,             # no layer decay in PySlowFast
    "model.drop_path_rate": 0.1,          # timesformer/models/vit.py:324 drop_path_rate=0.1
    "model.kwargs": {"attention_type": "divided_space_time"},  # *.yaml:17 ATTENTION_TYPE
                                                               # divided_space_time
    "data.train_crop": "short_side_jitter",  # timesformer/datasets/utils.py:142-149
                                             # spatial_sampling(-1)
    "data.rand_augment": "",              # no RandAugment in PySlowFast's loaders
    "data.reprob": 0.0,                   # no random erasing
    "data.mixup": 0.0,                    # defaults.py:263 MIXUP.ENABLED False
    "data.cutmix": 0.0,
    "data.label_smoothing": 0.0,          # *.yaml:31 LOSS_FUNC cross_entropy
    "data.mean": [0.45, 0.45, 0.45],      # defaults.py:298 DATA.MEAN
    "data.std": [0.225, 0.225, 0.225],    # defaults.py:304 DATA.STD
    "data.batch_size": 1,                 # *.yaml:4 TRAIN.BATCH_SIZE 8 / *.yaml:42 NUM_GPUS 8
    "engine.accum_steps": 8,              # defaults.py:432 GLOBAL_BATCH_SIZE 64 // 8
                                          # (train_net.py:51-52)
    "data.test_views": [1, 3],            # *.yaml:37-38 NUM_ENSEMBLE_VIEWS 1, NUM_SPATIAL_CROPS 3
    "data.short_side_scale": 0,           # test: short side to TEST_CROP_SIZE (= input_size),
                                          # kinetics.py:175-180
    "test_merge": "sum_logits",           # defaults.py:334 DATA.ENSEMBLE_METHOD "sum"
                                          # (of logits: vit.py:302-305)
    "seed": 0,                            # *.yaml:44 RNG_SEED 0 (TimeSformer_divST_8_224.yaml:47)
    "val_every": 5,                       # *.yaml:5 TRAIN.EVAL_PERIOD 5
}

RECIPES = {
    ("ssv2", "bcast_vit_b16"): {
        **BCAST_COMMON,
        "epochs": 50,                     # ssv2.sh:33 --epochs 50
        "data.batch_size": 6,             # ssv2.sh:23 --batch_size 6
        "engine.accum_steps": 4,          # ssv2.sh:45 --update_freq 4
        "model.drop_path_rate": 0.3,      # ssv2.sh:46 --drop_path 0.3
        "data.mixup_prob": 0.9,           # ssv2.sh:40 --mixup_prob 0.9
        "data.test_views": [2, 3],        # ssv2.sh:35-36 --test_num_segment 2 --test_num_crop 3
        "data.sampling": "segment",       # CAST dataset/datasets.py:103-108
                                          # SSVideoClsDataset(clip_len=1,
        "data.sampling_convention": "cast",  # num_segment=num_frames); dataset/ssv2.py:248-263
        "data.flip": False,               # CAST dataset/ssv2.py:203 random_horizontal_flip=False
                                          # for SSV2
    },
    ("kinetics400", "bcast_vit_b16"): {
        **BCAST_COMMON,
        "epochs": 70,                     # k400.sh:33 --epochs 70
        "data.batch_size": 6,             # k400.sh:23 --batch_size 6
        "engine.accum_steps": 6,          # k400.sh:44 --update_freq 6
        "model.drop_path_rate": 0.2,      # k400.sh:38 --drop_path 0.2
        "data.mixup_prob": 0.5,           # k400.sh:41 --mixup_prob 0.5
        "data.test_views": [5, 3],        # k400.sh:35-36 --test_num_segment 5 --test_num_crop 3
        "data.sampling": "dense",         # CAST dataset/datasets.py:72-80
                                          # VideoClsDataset(clip_len=16, num_segment=1)
        "data.sampling_rate": 4,          # run_bidirection.py:154 --sampling_rate default 4
        "data.sampling_convention": "cast",  # dataset/kinetics.py:246-270
        "data.flip": True,                # CAST dataset/kinetics.py:203 flip unless SSV2
    },
    # CAST's compositional EK100 recipe: the common values above are ek100.sh's too (--opt adamw
    # :29, --lr 1e-3 :30, --opt_betas :31, --weight_decay :32, --warmup_epochs 5 :46, --input_size
    # 224 :24, --short_side_size 224 :25, --reprob 0. :41, --mixup_switch_prob 0 :39, --num_frames
    # 16 :28, --num_workers 8 :37, --seed 0 :44; layer_decay, mixup, cutmix and smoothing are
    # run_bidirection_compo.py's defaults, at the lines of run_bidirection.py's)
    ("ek100", "bcast_compo_vit_b16"): {
        **BCAST_COMMON,
        # ek100.sh:16 --vmae_model compo_bidir_vit_base_patch16_224
        "model.name": "bcast_compo_vit_b16",
        "epochs": 50,                     # ek100.sh:33 --epochs 50
        "data.batch_size": 6,             # ek100.sh:23 --batch_size 6
        "engine.accum_steps": 4,          # ek100.sh:43 --update_freq 4
        "model.drop_path_rate": 0.2,      # ek100.sh:38 --drop_path 0.2
        "data.mixup_prob": 0.9,           # ek100.sh:40 --mixup_prob 0.9
        "data.test_views": [2, 3],        # ek100.sh:35-36 --test_num_segment 2 --test_num_crop 3
        # CAST dataset/datasets.py:133-147 EpicVideoClsDataset(clip_len=1, num_segment=num_frames);
        # dataset/epic.py:256-269 (TSN segments), :244-254 (test views)
        "data.sampling": "segment",
        "data.sampling_convention": "cast",
        "data.flip": True,                # CAST dataset/epic.py:201 flip unless SSV2
        "dataset": "ek100",               # ek100.sh:14 --data_set EPIC
        "train_split": "train",           # CAST dataset/datasets.py:123-125 train.csv
        "val_split": "val",               # CAST dataset/datasets.py:126-131 val.csv (val and test)
    },
    ("ucf101", "bcast_vit_b16"): {
        **BCAST_COMMON,
        "epochs": 30,                     # README.md:98 --epochs 30
        "data.batch_size": 8,             # README.md:88 --batch_size 8
        "engine.accum_steps": 6,          # README.md:109 --update_freq 6
        "model.drop_path_rate": 0.2,      # README.md:103 --drop_path 0.2
        "data.mixup_prob": 0.5,           # README.md:106 --mixup_prob 0.5
        "data.test_views": [5, 3],        # README.md:100-101 --test_num_segment 5 --test_num_crop 3
        "data.sampling": "segment",       # TSTL dataset/datasets.py:169-174
                                          # VideoClsDataset(clip_len=1,
        "data.sampling_rate": 4,          # frame_sample_rate=args.sampling_rate (4),
                                          # num_segment=num_frames)
        "data.sampling_convention": "tstl",  # TSTL dataset/kinetics.py:257-271
        "data.flip": True,                # TSTL dataset/kinetics.py:205 flip unless SSV2
    },
    ("kinetics400", "timesformer_vit_b16"): {
        **TSF_COMMON,
        "model.name": "timesformer_vit_b16",
        "data.num_frames": 8,             # TimeSformer_divST_8x32_224.yaml:10 NUM_FRAMES 8
        "data.sampling_rate": 32,         # TimeSformer_divST_8x32_224.yaml:11 SAMPLING_RATE 32
        "data.sampling": "dense",         # timesformer/datasets/kinetics.py:221-231 decoder.decode
        "data.sampling_convention": "pyslowfast",
        "data.jitter_scales": [256, 320],  # TimeSformer_divST_8x32_224.yaml:12 TRAIN_JITTER_SCALES
        "data.input_size": 224,           # TimeSformer_divST_8x32_224.yaml:13-14
                                          # TRAIN/TEST_CROP_SIZE 224
        "data.jitter_inverse_uniform": False,  # defaults.py:325 INV_UNIFORM_SAMPLE False
        "data.flip": True,                # defaults.py:328 RANDOM_FLIP True
        "data.num_workers": 8,            # TimeSformer_divST_8x32_224.yaml:40 NUM_WORKERS 8
    },
    ("kinetics400", "timesformer_hr_vit_b16"): {
        **TSF_COMMON,
        "model.name": "timesformer_hr_vit_b16",
        "data.num_frames": 16,            # TimeSformer_divST_16x16_448.yaml:10 NUM_FRAMES 16
        "data.sampling_rate": 16,         # TimeSformer_divST_16x16_448.yaml:11 SAMPLING_RATE 16
        "data.sampling": "dense",
        "data.sampling_convention": "pyslowfast",
        "data.jitter_scales": [448, 512],  # TimeSformer_divST_16x16_448.yaml:12 TRAIN_JITTER_SCALES
        "data.input_size": 448,           # TimeSformer_divST_16x16_448.yaml:13-14
                                          # TRAIN/TEST_CROP_SIZE 448
        "data.jitter_inverse_uniform": False,
        "data.flip": True,
    },
    ("kinetics400", "timesformer_l_vit_b16"): {
        **TSF_COMMON,
        "model.name": "timesformer_l_vit_b16",
        "data.num_frames": 96,            # TimeSformer_divST_96x4_224.yaml:10 NUM_FRAMES 96
        "data.sampling_rate": 4,          # TimeSformer_divST_96x4_224.yaml:11 SAMPLING_RATE 4
        "data.sampling": "dense",
        "data.sampling_convention": "pyslowfast",
        "data.jitter_scales": [256, 320],  # TimeSformer_divST_96x4_224.yaml:12
        "data.input_size": 224,           # TimeSformer_divST_96x4_224.yaml:13-14
        "data.jitter_inverse_uniform": False,
        "data.flip": True,
    },
    ("ssv2", "timesformer_vit_b16"): {
        **TSF_COMMON,
        "model.name": "timesformer_vit_b16",
        "data.num_frames": 8,             # TimeSformer_divST_8_224.yaml:11 NUM_FRAMES 8
        "data.sampling": "segment",       # timesformer/datasets/ssv2.py:225-233
        "data.sampling_convention": "pyslowfast",
        "data.jitter_scales": [256, 320],  # TimeSformer_divST_8_224.yaml:12
        "data.input_size": 224,           # TimeSformer_divST_8_224.yaml:13-14
        "data.jitter_inverse_uniform": True,  # TimeSformer_divST_8_224.yaml:16
                                              # INV_UNIFORM_SAMPLE True
        "data.flip": False,               # TimeSformer_divST_8_224.yaml:17 RANDOM_FLIP False
        "data.num_workers": 4,            # TimeSformer_divST_8_224.yaml:43 NUM_WORKERS 4
    },
    # No reference: TimeSformer's Kinetics recipe with its SSV2 frame rule
    # (configs/recipe/timesformer_vit_b16-ucf101.yaml says why); UCF101's flip and splits from
    # configs/data/ucf101.yaml.
    ("ucf101", "timesformer_vit_b16"): {
        **TSF_COMMON,
        "model.name": "timesformer_vit_b16",
        "data.num_frames": 8,
        "data.sampling": "segment",
        "data.sampling_convention": "pyslowfast",
        "data.jitter_scales": [256, 320],
        "data.input_size": 224,
        "data.jitter_inverse_uniform": False,
        "data.flip": True,
    },
}


def _get(cfg, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return to_dict(value)


@pytest.mark.parametrize("dataset,model", sorted(RECIPES))
def test_recipe_equals_its_reference(dataset: str, model: str) -> None:
    cfg = load_recipe(dataset, model)
    assert cfg.dataset == dataset
    wrong = {k: (_get(cfg, k), v) for k, v in RECIPES[(dataset, model)].items()
             if _get(cfg, k) != pytest.approx(v) and _get(cfg, k) != v}
    assert not wrong, f"resolved vs reference: {wrong}"


def test_timesformer_batch_and_lr_equal_pyslowfast_on_its_8_gpus() -> None:
    for model in ("timesformer_vit_b16", "timesformer_hr_vit_b16", "timesformer_l_vit_b16"):
        cfg = load_recipe("kinetics400", model)
        # *.yaml:42 NUM_GPUS 8
        plan = BatchPlan(cfg.data.batch_size, cfg.engine.accum_steps, world_size=8)
        assert plan.total == 64  # defaults.py:432 GLOBAL_BATCH_SIZE 64
        # *.yaml:19 BASE_LR 0.005 (absolute)
        assert plan.scaled(cfg.optim.lr) == pytest.approx(0.005)
        assert cfg.model.drop_path_rate == 0.1 and not cfg.data.mixup_active


@pytest.mark.parametrize("dataset", ["ssv2", "kinetics400", "ucf101"])
def test_bcast_fp16_is_casts_deepspeed_fp16(dataset: str) -> None:
    """With engine.precision=fp16 the generated DeepSpeed section is CAST's create_ds_config "fp16"
    block (util_tools/utils.py:756-761: enabled, loss_scale 0 = dynamic, initial_scale_power 7,
    loss_scale_window 128)
    plus DeepSpeed's own defaults for what CAST leaves out (hysteresis 2, min_loss_scale 1)."""
    cfg = load_recipe(dataset, "bcast_vit_b16", ["engine.precision=fp16"])
    plan = BatchPlan(cfg.data.batch_size, cfg.engine.accum_steps, 16)
    ds = deepspeed_config(cfg.engine, cfg.optim.clip_grad, plan)
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 7,
                          "loss_scale_window": 128, "hysteresis": 2, "min_loss_scale": 1}
    # our default (docs/training.md)
    assert load_recipe(dataset, "bcast_vit_b16").engine.precision == "bf16"


def test_cast_ek100_total_batch_and_lr() -> None:
    # models-cast-tstl.md 4.2: 6 x update_freq 4 x 16 GPUs = 384 clips, lr 1e-3 x 384 / 256 = 1.5e-3
    ek = load_recipe("ek100", "bcast_compo_vit_b16")
    plan = BatchPlan(ek.data.batch_size, ek.engine.accum_steps, 16)
    assert plan.total == 384 and plan.scaled(ek.optim.lr) == pytest.approx(1.5e-3)
    assert plan.scaled(ek.optim.min_lr) == pytest.approx(1.5e-6)


def test_cast_and_tstl_total_batches() -> None:
    # CAST scales --lr by the total batch like us (run_bidirection.py:363-365): lr x 6 x 4 x 16 /
    # 256 on 16 GPUs
    ssv2 = load_recipe("ssv2", "bcast_vit_b16")
    assert (BatchPlan(ssv2.data.batch_size, ssv2.engine.accum_steps, 16).scaled(ssv2.optim.lr)
            == pytest.approx(1.5e-3))
    # TSTL README.md:75-76: 2 GPUs x 8 nodes, batch 8 x update_freq 6 -> 768 clips, lr 3e-3
    ucf = load_recipe("ucf101", "bcast_vit_b16")
    plan = BatchPlan(ucf.data.batch_size, ucf.engine.accum_steps, 16)
    assert plan.total == 768 and plan.scaled(ucf.optim.lr) == pytest.approx(3e-3)


# --------------------------------------------------------------------------- layering, print-config


def test_recipe_files_layer_data_model_pair() -> None:
    files = recipe_files("ssv2", "timesformer_vit_b16")
    assert [p.relative_to(ROOT).as_posix() for p in files] == [
        "configs/data/ssv2.yaml", "configs/model/timesformer_vit_b16.yaml",
        "configs/recipe/timesformer_vit_b16-ssv2.yaml"]
    # no pair layer: data + model only
    assert len(recipe_files("ssv2", "timesformer_hr_vit_b16")) == 2
    with pytest.raises(ConfigError, match=r"no data config for dataset 'k400'; available "
                                          r"datasets: .*kinetics400"):
        recipe_files("k400", "bcast_vit_b16")
    with pytest.raises(ConfigError, match=r"no model config for model 'cast'; available "
                                          r"models: .*bcast_vit_b16"):
        recipe_files("ssv2", "cast")


def test_every_recipe_file_is_used_and_every_pair_loads() -> None:
    names = {p.stem for p in (ROOT / "configs/recipe").glob("*.yaml")}
    assert names == {f"{m}-{d}" for d, m in RECIPES}, (
        "a pair layer without a reference table row (or vice versa)")
    for d in ("ssv2", "ucf101", "kinetics400"):
        for m in ("bcast_vit_b16", "timesformer_vit_b16"):
            load_recipe(d, m)


def test_print_config_is_the_run_config_yaml(capsys: pytest.CaptureFixture) -> None:
    over = ["optim.lr=0.1", "out_dir=/tmp/x"]
    cfg = load_recipe("kinetics400", "timesformer_vit_b16", over)
    buf = io.StringIO()
    assert (print_config("kinetics400", "timesformer_vit_b16", over, file=buf)
            == dump_yaml(cfg) == buf.getvalue())
    assert main(["--dataset", "kinetics400", "--model", "timesformer_vit_b16", *over]) == 0
    out = capsys.readouterr().out
    # the trainer writes dump_yaml(cfg) to config.yaml: nothing else on stdout
    assert out == dump_yaml(cfg)
    assert yaml.safe_load(out)["optim"]["lr"] == 0.1
    assert main(["--dataset", "nope"]) == 2 and "available datasets" in capsys.readouterr().err


def test_makefile_layers_the_pair_recipe() -> None:
    def dry(*args: str) -> str:
        return subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout

    out = dry("train", "DATASET=ssv2", "MODEL=timesformer_vit_b16")
    assert ("--config configs/data/ssv2.yaml configs/model/timesformer_vit_b16.yaml "
            "configs/recipe/timesformer_vit_b16-ssv2.yaml") in out
    assert "configs/recipe" not in dry("train", "DATASET=ssv2", "MODEL=timesformer_hr_vit_b16")
    out = dry("print-config", "DATASET=ucf101", "OVERRIDES=optim.lr=0.1")
    assert ("-m tstl.cli print-config --dataset ucf101 --model bcast_vit_b16" in out
            and "optim.lr=0.1" in out)


# --------------------------------------------------------------------------- new config rules


def test_new_data_keys_are_validated() -> None:
    with pytest.raises(ValueError, match="1 or 2 temporal views"):
        DataConfig(sampling="segment", sampling_convention="cast", test_views=(5, 3))
    with pytest.raises(ValueError, match="jitter_scales"):
        DataConfig(train_crop="short_side_jitter", input_size=448, jitter_scales=(256, 320))
    with pytest.raises(ValueError, match="lr_steps"):
        OptimConfig(schedule="steps", lr_steps=[0, 11], lr_factors=[1.0])
    with pytest.raises(ValueError, match="start at 0"):
        OptimConfig(schedule="steps", lr_steps=[1, 11], lr_factors=[1.0, 0.1])


# --------------------------------------------------------------------------- step schedule


def test_step_factor_is_pyslowfast_steps_with_relative_lrs() -> None:
    # timesformer/utils/lr_policy.py:49-74 with STEPS [0, 11, 14], LRS [1, 0.1, 0.01], MAX_EPOCH 15
    steps, lrs = [0, 11, 14], [1, 0.1, 0.01]
    for epoch, factor in [(0, 1), (10.99, 1), (11, 0.1), (13.5, 0.1), (14, 0.01), (14.99, 0.01),
                          (15, 0.01)]:
        assert step_factor(epoch, steps, lrs) == factor, epoch


def test_step_schedule_per_optimizer_step() -> None:
    cfg = OptimConfig(name="sgd", lr=0.02, schedule="steps", lr_steps=[0, 11, 14],
                      lr_factors=[1, 0.1, 0.01], warmup_epochs=0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.005)
    sched = build_scheduler(opt, cfg, 0.005, 0.0, steps_per_epoch=10, epochs=15)
    lrs = []
    for _ in range(150):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == lrs[109] == pytest.approx(0.005)
    assert (lrs[110] == lrs[139] == pytest.approx(5e-4)
            and lrs[140] == lrs[149] == pytest.approx(5e-5))


# --------------------------------------------------------------------------- merge rule


def test_merge_rules_mean_softmax_and_sum_logits_differ_as_the_references_do() -> None:
    def z(*v):
        return np.array(v, dtype=np.float32)

    # one very confident view for class 0, two moderate views for class 1
    views = {("a", 0): (z(20, 0, 0), 0), ("a", 1): (z(0, 2, 0), 0), ("a", 2): (z(0, 2, 0), 0)}
    probs, _ = merge([views], "mean_softmax")  # CAST: softmax per view, then mean -> class 1

    def sm(v):
        return np.exp(v - v.max()) / np.exp(v - v.max()).sum()

    np.testing.assert_allclose(probs["a"], (sm(z(20, 0, 0)) + 2 * sm(z(0, 2, 0))) / 3, rtol=1e-5)
    assert int(np.argmax(probs["a"])) == 1
    probs, labels = merge([views], "sum_logits")  # PySlowFast: logits summed -> class 0
    np.testing.assert_allclose(probs["a"], sm(z(20, 4, 0)), rtol=1e-5)
    assert metrics(probs, labels, 3).top1 == 1.0
    with pytest.raises(ValueError, match="unknown merge rule"):
        merge([views], "max")


# --------------------------------------------------------------------------- jitter geometry


class _Stub:
    """A generator stand-in: ``uniform`` returns the middle of its range, ``integers`` its largest
    value."""

    def uniform(self, low: float, high: float) -> float:
        return (low + high) / 2

    def integers(self, low: int, high: int) -> int:
        return high - 1


def test_short_side_jitter_geometry_by_hand() -> None:
    # timesformer/datasets/transform.py:30-52: short side int(round(U(256, 320))) = 288 (stub:
    # middle); 240x320 -> 288 x floor(320 / 240 * 288) = 288 x 384; transform.py:99-108 random_crop:
    # randint(0, 288 - 224) <= 63, randint(0, 384 - 224) <= 159
    crop = short_side_jitter_crop(240, 320, 224, (256, 320), _Stub())
    assert crop == JitterCrop(source=(240, 320), resized=(288, 384), top=63, left=159, size=224)
    assert crop.box == pytest.approx((159 * 320 / 384, 63 * 240 / 288, 383 * 320 / 384,
                                      287 * 240 / 288))
    # INV_UNIFORM_SAMPLE: 1 / U(1/320, 1/256) -> 1 / middle = 284.44 -> 284
    assert jitter_short_side(_Stub(), 256, 320, inverse_uniform=True) == 284
    # portrait frames scale the width; a short side already at the size is not resized
    assert scaled_size(320, 240, 288) == (384, 288) and scaled_size(256, 340, 256) == (256, 340)
    assert (random_crop_offset(_Stub(), 224, 224, 224) == (0, 0)
            and random_crop_offset(_Stub(), 224, 300, 224) == (0, 75))


def test_short_side_jitter_ranges() -> None:
    rng = np.random.default_rng(0)
    sizes, tops = set(), set()
    for _ in range(2000):
        c = short_side_jitter_crop(240, 427, 224, (256, 320), rng)
        sizes.add(c.resized[0])
        tops.add(c.top)
        assert c.resized[1] == math.floor(427 / 240 * c.resized[0])
        assert 0 <= c.left < c.resized[1] - 224  # the high end is exclusive, as np.random.randint
        assert 0 <= c.top < c.resized[0] - 224 or c.resized[0] == 224
    assert min(sizes) == 256 and max(sizes) == 320 and min(tops) == 0 and max(tops) > 85


def test_train_transform_uses_the_jitter_box() -> None:
    from tstl.data.spatial import short_side_jitter_crop
    from tstl.data.transforms import TrainClipTransform

    cfg = DataConfig(input_size=32, train_crop="short_side_jitter", jitter_scales=(40, 48),
                     rand_augment="", reprob=0.0, mixup=0.0, cutmix=0.0, flip=False)
    frames = np.random.default_rng(0).integers(0, 255, size=(4, 36, 64, 3), dtype=np.uint8)
    tf = TrainClipTransform(cfg)
    top, left, h, w = tf.crop_box(36, 64, np.random.default_rng(1))
    crop = short_side_jitter_crop(36, 64, 32, (40, 48), np.random.default_rng(1))
    lft, t, r, b = crop.box
    assert ((top, left) == (round(t), round(lft)) and abs(h - (b - t)) <= 1
            and abs(w - (r - lft)) <= 1)
    # the box is the 32 px crop of a frame whose short side was scaled to 40..48: 36 * 32 / short
    # pixels high
    assert 36 * 32 / 48 - 1 <= h <= 36 * 32 / 40 + 1
    clip = tf(frames, np.random.default_rng(1))
    assert clip.shape == (4, 32, 32, 3) and clip.dtype == torch.uint8


# --------------------------------------------------------------------------- CAST layer decay


def _cast_layer_id(var_name: str, num_max_layer: int) -> int:
    # verbatim: KHU-VLL/CAST util_tools/optim_factory.py:24-44 (get_num_layer_for_vit)
    if (var_name in ("cls_token", "mask_token", "pos_embed")
            or var_name in ("visual.class_embedding", "visual.positional_embedding",
                            "visual.temporal_posembed", "visual.ln_pre")
            or var_name in ("clip_class_embedding", "clip_ln_pre.weight", "clip_ln_pre.bias",
                            "clip_conv1.weight", "clip_conv1.bias", "clip_positional_embedding")
            or var_name.startswith("patch_embed") or var_name.startswith("visual.conv1")):
        return 0
    elif var_name.startswith("rel_pos_bias"):
        return num_max_layer - 1
    elif var_name.startswith("blocks"):
        return int(var_name.split('.')[1]) + 1
    elif var_name.startswith("visual.transformer"):
        return int(var_name.split('.')[3]) + 1
    else:
        return num_max_layer - 1


@pytest.mark.parametrize("name,kwargs,post", [
    ("bcast_vit_b16", {"num_classes": 174}, ("noun_last_Adapter.D_fc1.weight", "head.weight")),
    # run_bidirection_compo.py:373-378 builds the same groups (the same optim_factory)
    ("bcast_compo_vit_b16", {}, ("head_noun.weight", "head_verb.weight", "head_verb.bias")),
])
def test_every_trainable_bcast_parameter_gets_casts_lr_scale_and_weight_decay(
        name: str, kwargs: dict, post: tuple) -> None:
    from tstl.models import create_model

    with torch.device("meta"):  # names and shapes only: no memory, no init time
        model = create_model(name, **kwargs)
    groups = param_groups(model, OptimConfig(layer_decay=0.75, weight_decay=0.05))
    by_id = {id(p): g for g in groups for p in g["params"]}
    # run_bidirection.py:374-376: values = [0.75 ** (12 + 1 - i) for i in range(14)]
    values = [0.75 ** (12 + 1 - i) for i in range(12 + 2)]
    # CAST models/bidir_modeling_crossattn.py:504 no_weight_decay; optim_factory.py:65-73 decay rule
    skip = {"clip_time_pos", "clip_space_pos", "vmae_space_pos", "vmae_time_pos", "pos_embed"}
    checked = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert id(p) not in by_id, name
            continue
        g = by_id[id(p)]
        assert g["lr_scale"] == pytest.approx(values[_cast_layer_id(name, len(values))]), name
        no_decay = (len(p.shape) == 1 or name.endswith(".bias") or name in skip
                    or any(s in name for s in skip))
        assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
        checked += 1
    named = dict(model.named_parameters())
    for top in ("clip_ln_post.weight", "vmae_fc_norm.weight", *post):
        # was block 11's 0.75 through timm's (99999,) merge
        assert by_id[id(named[top])]["lr_scale"] == 1.0
    assert by_id[id(named["blocks.11.cross_s_down.weight"])]["lr_scale"] == pytest.approx(0.75)
    assert by_id[id(named["blocks.0.cross_s_down.weight"])]["lr_scale"] == pytest.approx(0.75 ** 12)
    assert checked > 500


def test_weight_decay_all_decays_every_parameter() -> None:
    from tstl.models import create_model

    model = create_model("timesformer_test", num_classes=5)
    groups = param_groups(model, OptimConfig(name="sgd", weight_decay=1e-4, weight_decay_all=True,
                                             layer_decay=1.0))
    assert ({g["weight_decay"] for g in groups} == {1e-4}
            and {g["lr_scale"] for g in groups} == {1.0})
    groups = param_groups(model, OptimConfig(name="sgd", weight_decay=1e-4, layer_decay=1.0))
    assert {g["weight_decay"] for g in groups} == {0.0, 1e-4}
