"""Validation in one place (issue 24): field rules on every layer, whole-config rules once after
the last one."""

from __future__ import annotations

from pathlib import Path

import pytest

from tstl.core.config import ConfigError, load_config
from tstl.train import config as train_config
from tstl.train.config import TrainConfig
from tstl.twostage.config import TSTLConfig

ROOT = Path(__file__).resolve().parents[2]
BASE = [ROOT / "configs/data/ssv2.yaml", ROOT / "configs/model/bcast_vit_b16.yaml"]


def test_deepspeed_checks_the_merged_config_once(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = train_config.validate_deepspeed
    monkeypatch.setattr(train_config, "validate_deepspeed", lambda *a: calls.append(a) or real(*a))
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("engine:\n  deepspeed:\n    flops_profiler: {enabled: true}\n")
    b.write_text("engine:\n  deepspeed:\n    tensorboard: {enabled: true, output_path: runs/x}\n")
    cfg = load_config(TrainConfig, [*BASE, a, b], ["engine.deepspeed.steps_per_print=50"])
    assert len(calls) == 1  # not once per layer: DeepSpeed's parser sees the final config
    assert calls[0][0].deepspeed == {"flops_profiler": {"enabled": True}, "steps_per_print": 50,
                                     "tensorboard": {"enabled": True, "output_path": "runs/x"}}
    assert cfg.engine.deepspeed["steps_per_print"] == 50
    assert not load_config(TrainConfig, BASE).engine.deepspeed
    assert len(calls) == 1  # no engine.deepspeed: no DeepSpeed


def test_owned_deepspeed_keys_are_refused_on_the_layer_that_sets_them(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  deepspeed:\n    optimizer: {type: Adam, params: {lr: 0.1}}\n")
    message = (r"bad\.yaml: .*engine.deepspeed.optimizer is generated from our config: set "
               r"optim.name and optim.\* instead")
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, [*BASE, bad])


def test_a_misspelt_deepspeed_key_names_the_files(tmp_path: Path) -> None:
    message = (r"bcast_vit_b16\.yaml \+ command line: DeepSpeed does not know "
               r"engine\.deepspeed\.flops_profilr")
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, BASE, ["engine.deepspeed.flops_profilr.enabled=true"])


def _tstl(tmp_path: Path, *extra: str) -> TSTLConfig:
    return load_config(TSTLConfig, [*BASE, ROOT / "configs/tstl/default.yaml"],
                       [f"out_dir={tmp_path}", *extra])


def test_tstl_checks_run_once_per_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = TSTLConfig.check
    monkeypatch.setattr(TSTLConfig, "check", lambda self: calls.append(1) or real(self))
    _tstl(tmp_path, "tstl.num_groups=2")
    assert calls == [1]


def test_a_stage_deepspeed_override_is_checked_and_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tstl\.expert: DeepSpeed does not know "
                                          r"engine\.deepspeed\.flops_profilr"):
        _tstl(tmp_path, "tstl.num_groups=2",
              "tstl.expert.engine.deepspeed.flops_profilr.enabled=true")


def test_training_needs_weights_in_every_stage(tmp_path: Path) -> None:
    cfg = _tstl(tmp_path, "tstl.num_groups=2")  # loads: evaluation needs no init
    with pytest.raises(ConfigError, match=r"^TSTL needs weights to start from: give tstl.init="):
        cfg.check_weights()
    _tstl(tmp_path, "tstl.num_groups=2", "tstl.init=[cast.pth]").check_weights()
    _tstl(tmp_path, "tstl.num_groups=2", "model.init=[clip.pt]").check_weights()
    one = _tstl(tmp_path, "tstl.num_groups=2", "model.init=[clip.pt]", "tstl.expert.model.init=[]")
    with pytest.raises(ConfigError, match=r"^tstl\.expert: TSTL needs weights"):
        one.check_weights()
