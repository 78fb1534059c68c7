"""Official checkpoint files load safely: each layout the reference code writes, built here with
random small weights, loads into the matching tiny model under ``weights_only`` with the allow-list;
a file whose pickle names any other global is refused with the global named, unless the user opts in
(then it loads with a WARNING).

Layouts transcribed from (commits as in /work/shared/reference/models-cast-tstl.md and
models-timesformer.md):

* MCG-NJU/VideoMAE@14ef8d8 ``utils.py`` L405-422 (``save_model``, torch-amp path: model, optimizer,
  epoch, scaler, args) and L423-427 (DeepSpeed path: ``model.save_checkpoint`` with client state
  ``{"epoch": epoch}``); called by ``run_mae_pretraining.py`` L242-244 and
  ``run_class_finetuning.py`` L508-519 (``epoch="best"``).
* KHU-VLL/CAST@51eb871 ``util_tools/utils.py`` L658-680 (the same ``save_model``);
  ``run_bidirection.py`` L483-485 saves ``epoch="best"`` -> ``checkpoint-best.pth`` (torch-amp) or
  ``checkpoint-best/mp_rank_00_model_states.pt`` (``--enable_deepspeed``, which
  ``scripts/ssv2/ssv2.sh`` L43 passes).
* saddy-paddy/TSTL@685226b ``util_tools/utils.py`` L667-689 (the same ``save_model``); selector from
  ``train_selector.py`` L621-632 (head over the groups, ``args.nb_classes`` set at L359), experts
  from ``train_experts.py`` L570-582 (``expert-{i}.pth``, a head over every class).
* microsoft/DeepSpeed ``deepspeed/runtime/engine.py`` ``_save_checkpoint`` (L3270-3309 at 3a3dfe66b,
  the commit CAST's README pins; L3453-3494 at 38327e0 adds frozen_param_shapes, shared_params,
  frozen_param_fragments), ``deepspeed/runtime/fp16/fused_optimizer.py`` L435-444
  (FP16_Optimizer.state_dict, CAST's fp16 optimizer).
* facebookresearch/TimeSformer@a5ef29a ``timesformer/utils/checkpoint.py`` L107-135
  (``save_checkpoint``: epoch, model_state with the ``model.`` prefix, optimizer_state, cfg as a
  YAML string; no args).
* The optimizer state every CAST/TSTL/VideoMAE file holds: ``utils.cosine_scheduler`` returns a
  numpy array (CAST ``util_tools/utils.py`` L638-655, TSTL L647-664, VideoMAE ``utils.py`` L385-402)
  and the engines set ``param_group["lr"] = lr_schedule_values[it] * param_group["lr_scale"]`` and
  ``param_group["weight_decay"] = wd_schedule_values[it]`` (CAST ``engine_for_onemodel.py`` L49-54,
  TSTL L72-77, VideoMAE ``engine_for_finetuning.py`` L49-54, ``engine_for_pretraining.py`` L26-31):
  ``numpy.float64`` in every param group, pickled as numpy's scalar constructor + ``numpy.dtype``.
  Files from numpy 1.x (TSTL pins torch 1.11) name the constructor ``numpy.core.multiarray.scalar``,
  numpy 2 ``numpy._core.multiarray.scalar``; ``_save`` writes both.
* DeepSpeed fp16 (CAST's ``create_ds_config``, ``util_tools/utils.py`` L740-761) halves the whole
  module, so ``mp_rank_00_model_states.pt`` holds fp16 weights, frozen experts included; fp32
  masters sit in the optimizer.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from tstl.models import UntrustedCheckpointError, VideoClassifier, create_model, load_checkpoint
from tstl.models.checkpoint import SAFE_GLOBALS, TRUSTED_ENV, read_checkpoint


class RunState:
    """A custom class pickled into a checkpoint: its global is outside the allow-list."""

    def __init__(self) -> None:
        self.best = 0.5


def _seeded(name: str, seed: int, **kwargs) -> VideoClassifier:
    torch.manual_seed(seed)
    model = create_model(name, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _args(**extra) -> argparse.Namespace:
    """The kind of values the reference parsers hold: strings, numbers, bools, None, tuples,
    lists."""
    return argparse.Namespace(batch_size=6, epochs=50, update_freq=1, save_ckpt_freq=10,
                              input_size=224, num_frames=16, tubelet_size=2, patch_size=(16, 16),
                              lr=1e-3 * 48 / 256, layer_decay=0.75, opt_betas=None, clip_grad=None,
                              mixup=0.8, smoothing=0.1, output_dir="/tmp/out", log_dir=None,
                              device="cuda", seed=0, resume="", auto_resume=True, save_ckpt=True,
                              dist_on_itp=False, distributed=True, rank=0, world_size=16, gpu=0,
                              dist_backend="nccl", dist_url="env://", enable_deepspeed=True,
                              deepspeed=False, deepspeed_config="/tmp/out/deepspeed_config.json",
                              deepscale=False, deepscale_config=None, **extra)


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """CAST ``util_tools/utils.py`` L638-655 (VideoMAE and TSTL the same), restated: a numpy
    array."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = (np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_epochs > 0
              else np.array([]))
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    half = 0.5 * (base_value - final_value)
    schedule = np.array([final_value + half * (1 + math.cos(math.pi * i / len(iters)))
                         for i in iters])
    return np.concatenate((warmup, schedule))


def _optimizer_state(model: nn.Module, it: int = 7) -> dict:
    """AdamW after one step at iteration ``it``, its groups set as the reference engines set them
    (numpy floats)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay, no_decay = [p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]
    # optim_factory.get_parameter_groups: "lr_scale" from LayerDecayValueAssigner (a Python float)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05, "lr_scale": 0.75 ** 2},
                             {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}], lr=1e-3)
    lr_schedule_values = cosine_scheduler(1.5e-3, 1.5e-6, 2, 10, warmup_epochs=1)
    wd_schedule_values = cosine_scheduler(0.05, 0.05, 2, 10)
    for param_group in opt.param_groups:  # engine_for_onemodel.py L50-54
        param_group["lr"] = lr_schedule_values[it] * param_group["lr_scale"]
        if param_group["weight_decay"] > 0:
            param_group["weight_decay"] = wd_schedule_values[it]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in params:
        p.grad = None
    state = opt.state_dict()
    assert type(state["param_groups"][0]["lr"]) is np.float64  # what the reference files pickle
    return state


def _save(obj: dict, path: Path, numpy_names: str = "numpy2", **kwargs) -> Path:
    """``torch.save``; ``numpy_names="numpy1"`` rewrites the pickle's GLOBAL opcodes to the names
    numpy 1.x writes (``numpy.core.multiarray.scalar``), copying every other record of the zip
    archive as it is."""
    torch.save(obj, path, **kwargs)
    if numpy_names == "numpy1":
        reader = torch._C.PyTorchFileReader(str(path))
        records = {name: reader.get_record(name) for name in reader.get_all_records()}
        del reader
        pkl = records["data.pkl"]
        assert b"cnumpy._core.multiarray\nscalar\n" in pkl
        records["data.pkl"] = pkl.replace(b"cnumpy._core.multiarray\nscalar\n",
                                          b"cnumpy.core.multiarray\nscalar\n")
        writer = torch._C.PyTorchFileWriter(str(path))
        for name, data in records.items():
            writer.write_record(name, data, len(data))
        writer.write_end_of_file()
        del writer
    return path


def _numpy_globals(path: Path) -> set[str]:
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    return {g for g in unsafe if g.startswith("numpy")}


# GradScaler.state_dict() (VideoMAE's NativeScalerWithGradNormCount.state_dict returns it).
_SCALER = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
           "_growth_tracker": 3}


def _amp_checkpoint(model_sd: dict, model: nn.Module, epoch, args: argparse.Namespace) -> dict:
    """utils.save_model, torch-amp path (VideoMAE utils.py L411-417; CAST L664-670; TSTL
    L673-679)."""
    return {"model": model_sd, "optimizer": _optimizer_state(model), "epoch": epoch,
            "scaler": dict(_SCALER), "args": args}


def _deepspeed_model_states(module_sd: dict, model: nn.Module, client_state: dict) -> dict:
    """DeepSpeedEngine._save_checkpoint, non-ZeRO fp16 (engine.py L3284-3305 at 3a3dfe66b,
    L3469-3490 now); the module is fp16 (the fp16 engine halves it), the fp32 masters are in the
    optimizer's fp32_groups_flat."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    inner = _optimizer_state(model)
    for group in inner["param_groups"]:  # DeepSpeed FusedAdam groups (adam_w_mode: CAST's config)
        group.update(bias_correction=True, adam_w_mode=True)
    fp16_optimizer = {  # FP16_Optimizer.state_dict (fused_optimizer.py L435-444)
        "dynamic_loss_scale": True, "cur_scale": 128.0, "cur_iter": 1000, "last_overflow_iter": 870,
        "scale_factor": 2.0, "scale_window": 128, "optimizer_state_dict": inner,
        "fp32_groups_flat": [torch.cat([p.detach().float().flatten() for p in trainable])],
        "clip_grad": 0.0,
    }
    state = dict(module={k: v.half() if v.is_floating_point() else v for k, v in module_sd.items()},
                 buffer_names=[n for n, _ in model.named_buffers() if n in module_sd],
                 optimizer=fp16_optimizer,
                 param_shapes=None,  # ZeRO/bf16 only: list of OrderedDict name -> torch.Size
                 frozen_param_shapes=None, shared_params=None, frozen_param_fragments=None,
                 lr_scheduler=None, data_sampler=None, random_ltd=None,
                 sparse_tensor_module_names=set(),
                 skipped_steps=12, global_steps=1000, global_samples=96000, dp_world_size=16,
                 mp_world_size=1, ds_config="/tmp/out/deepspeed_config.json",
                 ds_version="0.8.0+3a3dfe66")
    state.update(client_state)
    return state


def _same_weights(model: nn.Module, src: nn.Module, fp16: bool = False) -> None:
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v.half().float() if fp16 else v), k


NUMPY = pytest.mark.parametrize("numpy_names", ["numpy2", "numpy1"])


def _saved(ckpt: dict, path: Path, numpy_names: str) -> Path:
    """Save as the reference does; check the file pickles the numpy globals of that numpy."""
    _save(ckpt, path, numpy_names)
    scalar = {"numpy2": "numpy._core.multiarray.scalar", "numpy1": "numpy.core.multiarray.scalar"}
    scalar = scalar[numpy_names]
    assert _numpy_globals(path) == {scalar, "numpy.dtype"}
    return path


@NUMPY
def test_videomae_pretrain_checkpoint_with_args(tmp_path: Path, numpy_names: str) -> None:
    """run_mae_pretraining.py -> checkpoint-799.pth: the encoder under "encoder.", the decoder
    beside it."""
    src = _seeded("bcast_test", 1, num_classes=5)
    sd = src.state_dict()
    enc = {f"encoder.{k}": v for k, v in sd.items()
           if k.startswith("patch_embed.")
           or (k.startswith("blocks.") and k.split(".")[2] in ("norm1", "attn", "norm2", "mlp"))}
    enc.update({"encoder.norm.weight": torch.ones(64), "encoder.norm.bias": torch.zeros(64),
                "encoder_to_decoder.weight": torch.randn(32, 64),
                "mask_token": torch.zeros(1, 1, 32),
                "decoder.blocks.0.norm1.weight": torch.ones(32),
                "decoder.head.weight": torch.randn(1536, 32)})
    ckpt = _amp_checkpoint(enc, src, 799, _args(mask_type="tube", mask_ratio=0.9,
                                                window_size=(8, 14, 14), normlize_target=True,
                                                model="pretrain_videomae_base_patch16_224"))
    path = _saved(ckpt, tmp_path / "checkpoint-799.pth", numpy_names)
    model = create_model("bcast_test", num_classes=5)
    report = load_checkpoint(model, path)
    assert report.format == "videomae-pretrain" and not report.unexplained
    assert torch.equal(model.state_dict()["blocks.1.attn.qkv.weight"],
                       sd["blocks.1.attn.qkv.weight"])


@NUMPY
@pytest.mark.parametrize("deepspeed", [False, True])
def test_videomae_finetune_checkpoint(tmp_path: Path, deepspeed: bool, numpy_names: str) -> None:
    """run_class_finetuning.py -> checkpoint-best.pth (torch-amp, with args) or
    mp_rank_00_model_states.pt."""
    src = _seeded("bcast_test", 2, num_classes=5)
    sd = src.state_dict()
    vmae = {k: v for k, v in sd.items()
            if k.startswith("patch_embed.")
            or (k.startswith("blocks.") and k.split(".")[2] in ("norm1", "attn", "norm2", "mlp"))}
    vmae.update({"fc_norm.weight": torch.ones(64), "fc_norm.bias": torch.zeros(64),
                 "head.weight": sd["head.weight"], "head.bias": sd["head.bias"]})
    if deepspeed:
        ckpt = _deepspeed_model_states(vmae, src, {"epoch": "best"})
        name = "mp_rank_00_model_states.pt"
    else:
        ckpt = _amp_checkpoint(vmae, src, "best", _args(model="vit_base_patch16_224", nb_classes=5))
        name = "checkpoint-best.pth"
    path = _saved(ckpt, tmp_path / name, numpy_names)
    model = create_model("bcast_test", num_classes=5)
    report = load_checkpoint(model, path)
    assert report.format == "videomae-finetune" and not report.unexplained
    cast = (lambda t: t.half().float()) if deepspeed else (lambda t: t)
    assert torch.equal(model.head.weight, cast(sd["head.weight"]))
    patch = "patch_embed.proj.weight"
    assert torch.equal(model.state_dict()[patch], cast(sd[patch]))


@NUMPY
@pytest.mark.parametrize("layout", ["amp", "deepspeed", "deepspeed-with-args"])
def test_cast_checkpoint_best(tmp_path: Path, layout: str, numpy_names: str) -> None:
    """CAST run_bidirection.py, epoch "best": checkpoint-best.pth or
    checkpoint-best/mp_rank_00_model_states.pt (fp16 module). The DeepSpeed client state is
    {"epoch": ...} in the reference (utils.py L677-680);
    "deepspeed-with-args" adds the run's args as other scripts' client state does."""
    src = _seeded("bcast_test", 3, num_classes=5)
    if layout == "amp":
        ckpt, name = (_amp_checkpoint(src.state_dict(), src, "best",
                                      _args(data_set="SSV2", nb_classes=5, window_size=16)),
                      "checkpoint-best.pth")
    else:
        client = {"epoch": "best", **({"args": _args()} if layout == "deepspeed-with-args" else {})}
        ckpt, name = (_deepspeed_model_states(src.state_dict(), src, client),
                      "mp_rank_00_model_states.pt")
    (tmp_path / "checkpoint-best").mkdir()
    path = _saved(ckpt, tmp_path / "checkpoint-best" / name, numpy_names)
    model = create_model("bcast_test", num_classes=5)
    report = load_checkpoint(model, path)
    assert report.format == "cast" and not report.missing and not report.unexpected
    _same_weights(model, src, fp16=layout != "amp")


@NUMPY
def test_tstl_selector_and_experts(tmp_path: Path, numpy_names: str) -> None:
    """TSTL train_selector.py / train_experts.py: CAST-layout files, selector head over groups,
    experts over all classes (8 here, 174 in TSTL), each with the run's args."""
    selector = _seeded("bcast_test", 4, num_classes=3)
    args = _args(nb_classes=3, data_set="SSV2")
    ckpt = _amp_checkpoint(selector.state_dict(), selector, "best", args)
    _saved(ckpt, tmp_path / "checkpoint-best.pth", numpy_names)
    experts = [_seeded("bcast_test", 10 + i, num_classes=8) for i in range(3)]
    for i, e in enumerate(experts):
        _saved(_amp_checkpoint(e.state_dict(), e, 4, _args(nb_classes=8, data_set="SSV2")),
               tmp_path / f"expert-{i}.pth", numpy_names)
    model = create_model("bcast_test", num_classes=3)
    assert load_checkpoint(model, tmp_path / "checkpoint-best.pth").format == "cast"
    _same_weights(model, selector)
    for i, e in enumerate(experts):
        model = create_model("bcast_test", num_classes=8)
        report = load_checkpoint(model, tmp_path / f"expert-{i}.pth")
        assert report.format == "cast" and not report.missing and not report.unexpected
        _same_weights(model, e)


@NUMPY
def test_the_numpy_values_come_back_as_numpy(tmp_path: Path, numpy_names: str) -> None:
    """The allow-list rebuilds the optimizer's numpy scalars exactly (numpy 1.x names resolve under
    numpy 2)."""
    src = _seeded("bcast_test", 8, num_classes=5)
    ckpt = _amp_checkpoint(src.state_dict(), src, 3, _args())
    path = _saved(ckpt, tmp_path / "checkpoint-3.pth", numpy_names)
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        back = torch.load(path, weights_only=True, mmap=True)
    for saved, loaded in zip(ckpt["optimizer"]["param_groups"], back["optimizer"]["param_groups"]):
        assert type(loaded["lr"]) is np.float64 and loaded["lr"] == saved["lr"]
        assert loaded["weight_decay"] == saved["weight_decay"]
    assert isinstance(back["args"], argparse.Namespace) and back["args"].patch_size == (16, 16)


class _Shell:
    """Pickles as a call of os.system, the classic pickle exploit."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@NUMPY
def test_other_globals_are_still_refused(tmp_path: Path, numpy_names: str) -> None:
    """The numpy entries open nothing else: os.system next to the numpy scalars, and a numpy array
    (its _reconstruct global), are refused and named; the command never runs."""
    marker = tmp_path / "ran"
    src = _seeded("bcast_test", 9, num_classes=5)
    ckpt = _amp_checkpoint(src.state_dict(), src, 1, _args())
    path = _save({**ckpt, "hook": _Shell(f"touch {marker}")}, tmp_path / "evil.pth", numpy_names)
    with pytest.raises(UntrustedCheckpointError) as err:
        load_checkpoint(create_model("bcast_test", num_classes=5), path)
    assert err.value.globals == [f"{os.system.__module__}.system"] and "system" in str(err.value)
    assert not marker.exists()
    path = _save({**ckpt, "stats": np.zeros(3)}, tmp_path / "array.pth", numpy_names)
    with pytest.raises(UntrustedCheckpointError) as err:
        read_checkpoint(path)
    assert any(g.endswith("_reconstruct") for g in err.value.globals)


def test_timesformer_pyth(tmp_path: Path) -> None:
    """PySlowFast save_checkpoint -> checkpoint_epoch_00015.pyth (model. prefix, SGD state, cfg YAML
    string)."""
    src = _seeded("timesformer_test", 5)
    params = list(src.parameters())
    opt = torch.optim.SGD(params, lr=0.005, momentum=0.9, weight_decay=1e-4, nesterov=True)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    ckpt = {"epoch": 15,
            "model_state": OrderedDict((f"model.{k}", v) for k, v in src.state_dict().items()),
            "optimizer_state": opt.state_dict(),
            "cfg": "MODEL:\n  ARCH: vit\n  MODEL_NAME: vit_base_patch16_224\n  NUM_CLASSES: 8\n"
                   "TRAIN:\n  BATCH_SIZE: 8\n"}
    torch.save(ckpt, tmp_path / "checkpoint_epoch_00015.pyth")
    model = create_model("timesformer_test")
    report = load_checkpoint(model, tmp_path / "checkpoint_epoch_00015.pyth")
    assert report.format == "timesformer" and not report.missing and not report.unexpected
    _same_weights(model, src)


def _foreign(tmp_path: Path, zipfile: bool = True) -> tuple[Path, VideoClassifier]:
    src = _seeded("bcast_test", 6, num_classes=5)
    path = tmp_path / "checkpoint-best.pth"
    torch.save({**_amp_checkpoint(src.state_dict(), src, "best", _args()), "run_state": RunState()},
               path, _use_new_zipfile_serialization=zipfile)
    return path, src


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_a_foreign_global_is_refused_and_named(tmp_path: Path, zipfile: bool) -> None:
    path, _ = _foreign(tmp_path, zipfile)
    with pytest.raises(UntrustedCheckpointError) as err:
        load_checkpoint(create_model("bcast_test", num_classes=5), path)
    msg = str(err.value)
    assert str(path) in msg and "RunState" in msg and "argparse" not in " ".join(err.value.globals)
    assert [g.rsplit(".", 1)[-1] for g in err.value.globals] == ["RunState"]
    assert "trusted=True" in msg and TRUSTED_ENV in msg and "trusted_checkpoints" in msg
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("how", ["argument", "config-list", "environment"])
def test_the_opt_in_loads_a_trusted_file_with_a_warning(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        how: str) -> None:
    path, src = _foreign(tmp_path)
    trusted: object = False
    if how == "argument":
        trusted = True
    elif how == "config-list":
        trusted = [str(tmp_path / "other.pth"), str(path)]
    else:
        monkeypatch.setenv(TRUSTED_ENV, os.pathsep.join([str(tmp_path / "other.pth"), str(path)]))
    model = create_model("bcast_test", num_classes=5)
    with caplog.at_level(logging.WARNING, logger="tstl.models.checkpoint"):
        report = load_checkpoint(model, path, trusted=trusted)
    assert report.format == "cast"
    _same_weights(model, src)
    warnings = [r for r in caplog.records
                if r.levelno == logging.WARNING and "weights_only=False" in r.getMessage()]
    assert (len(warnings) == 1 and str(path) in warnings[0].getMessage()
            and "RunState" in warnings[0].getMessage())


def test_a_trusted_file_that_is_safe_loads_without_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = _seeded("bcast_test", 7, num_classes=5)
    torch.save(_amp_checkpoint(src.state_dict(), src, 1, _args()), tmp_path / "c.pth")
    with caplog.at_level(logging.WARNING, logger="tstl.models.checkpoint"):
        assert read_checkpoint(tmp_path / "c.pth", trusted=True).keys() == src.state_dict().keys()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
