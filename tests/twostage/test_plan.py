from pathlib import Path

import pytest

from tstl.core.config import ConfigError, load_config
from tstl.twostage.config import TSTLConfig
from tstl.twostage.groups import ClassGroups
from tstl.twostage.stages import expert_file, expert_stage, pending_experts, selector_stage

GROUPS = ClassGroups(((0, 5), (1, 2, 3), (4, 6, 7)), 8)
ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, *extra):
    files = [ROOT / "configs/data/ssv2.yaml", ROOT / "configs/model/bcast_vit_b16.yaml",
             ROOT / "configs/tstl/default.yaml"]
    cfg = load_config(TSTLConfig, files,
                      [f"out_dir={tmp_path}", "model.init=[clip.pt,vmae.pth]", *extra])
    cfg.check()
    return cfg


def test_stage_configs_filter_relabel_and_layer_the_overrides(tmp_path):
    cfg = _cfg(tmp_path, "tstl.init=[cast.pth]", "tstl.expert.epochs=3",
               "tstl.selector.optim.lr=2e-3")
    stage = selector_stage(cfg, GROUPS)
    sel = stage.config
    assert (stage.label_map == dict(enumerate([0, 1, 1, 1, 2, 0, 2, 2]))
            and sel.model.num_classes == 3)
    assert not stage.adapters
    assert sel.model.init == ["clip.pt", "vmae.pth", "cast.pth"] and sel.optim.lr == 2e-3
    assert sel.out_dir == str(tmp_path / "selector") and sel.test_at_end is False
    # recipe override, else the run's
    assert sel.epochs == 10 and sel.data.num_frames == cfg.data.num_frames
    expert = expert_stage(cfg, GROUPS, 2)
    ex = expert.config
    # filter + relabel; head rows
    assert expert.label_map == {4: 0, 6: 1, 7: 2} and len(expert.adapters) == 1
    assert ex.model.num_classes == 3 and ex.epochs == 3 and ex.optim.lr == cfg.optim.lr
    assert (ex.out_dir == str(tmp_path / "expert_02")
            and ex.model.init == ["clip.pt", "vmae.pth", "cast.pth"])
    assert ex.train_split == cfg.train_split  # the same shards, filtered on the fly
    sub = expert_stage(_cfg(tmp_path, "tstl.expert_split=train-g{group:02d}"), GROUPS, 2)
    assert sub.config.train_split == "train-g02" and sub.label_map == {4: 0, 6: 1, 7: 2}


@pytest.mark.parametrize("override, message", [
    ("tstl.expert.optim.lrr=1", "unknown key 'optim.lrr'"),
    ("tstl.selector.model.freeze_pretrained=false", "freeze_pretrained must be true"),
    ("tstl.num_groups=0", "tstl.groups=<group file> or tstl.num_groups"),
    ("tstl.soft_top_k=0", "soft_top_k"),
    ("tstl.expert_split=train-sub", "must contain {group}"),
])
def test_bad_tstl_configs_are_refused_at_load(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, override)


def test_resume_skips_finished_experts(tmp_path):
    assert pending_experts(GROUPS, tmp_path) == [0, 1, 2]
    for g in (0, 2):
        expert_file(tmp_path, g).parent.mkdir(parents=True)
        expert_file(tmp_path, g).write_bytes(b"x")
    # killed mid-training: folder but no expert file
    expert_file(tmp_path, 1).parent.mkdir(parents=True)
    assert pending_experts(GROUPS, tmp_path) == [1]


def test_cli_groups(tmp_path):
    import numpy as np

    from tstl.twostage.cli import main
    from tstl.twostage.groups import load_groups

    assert main(["groups", "--num-groups", "4", "--num-classes", "8", "--out",
                 str(tmp_path / "b.json")]) == 0
    assert load_groups(tmp_path / "b.json").groups == ((0, 1), (2, 3), (4, 5), (6, 7))
    conf = np.eye(8) * 10
    for a, b in ((0, 7), (1, 6), (2, 5), (3, 4)):
        conf[a, b] = conf[b, a] = 5
    np.save(tmp_path / "c.npy", conf)
    assert main(["groups", "--method", "confusion", "--num-groups", "4", "--confusion",
                 str(tmp_path / "c.npy"), "--format", "tstl", "--out",
                 str(tmp_path / "c.json")]) == 0
    assert load_groups(tmp_path / "c.json").groups == ((0, 7), (1, 6), (2, 5), (3, 4))


def test_shipped_tstl_recipes_load_and_pass_the_checks():
    for files in (["data/ucf101.yaml", "model/bcast_vit_b16.yaml", "tstl/default.yaml"],
                  ["data/ssv2.yaml", "demo.yaml", "tstl/demo.yaml"]):
        cfg = load_config(TSTLConfig, [ROOT / "configs" / f for f in files])
        cfg.check()
        assert selector_stage(cfg, GROUPS).config.model.freeze_pretrained
    with pytest.raises(ConfigError, match="freeze_pretrained must be true"):
        # the plain demo trains its experts
        load_config(TSTLConfig,
                    [ROOT / "configs" / f
                     for f in ("data/ssv2.yaml", "demo.yaml", "tstl/default.yaml")]).check()


def test_training_without_weights_to_start_from_is_refused(tmp_path):
    from tstl.twostage.train import train_two_stage

    cfg = load_config(TSTLConfig,
                      [ROOT / "configs" / f
                       for f in ("data/ssv2.yaml", "demo.yaml", "tstl/demo.yaml")],
                      [f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"tstl.init=\[<trained B-CAST run or checkpoint>\]"):
        train_two_stage(cfg)
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_stage_init_is_pinned_and_a_changed_init_is_refused_on_resume(tmp_path, monkeypatch):
    import json

    import torch

    from tstl.train.config import TrainConfig
    from tstl.twostage.train import pin_init

    for name in ("a.pt", "b.pt"):
        torch.save({"x": torch.zeros(1)}, tmp_path / name)
    stage = TrainConfig(out_dir=str(tmp_path / "expert_00"))
    stage.model.init = ["a.pt"]  # relative, as typed on a command line
    monkeypatch.chdir(tmp_path)
    pinned, frozen = pin_init(stage)
    assert (pinned.model.init == [str(tmp_path / "a.pt")]
            == [c["path"] for c in frozen["checkpoints"]])
    stage.model.init = ["b.pt"]
    pin_init(stage)  # nothing trained yet: the stage simply starts from b
    marker = tmp_path / "expert_00/checkpoints/step-0000001/complete.json"
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"step": 1, "epoch": 0, "metric": None, "world_size": 1}))
    stage.model.init = ["a.pt"]
    with pytest.raises(ConfigError, match="was started from"):
        pin_init(stage)


def _on_main_worker(rank: int, port: str, results) -> None:
    import os

    import torch.distributed as tdist

    from tstl.train import dist

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port)
    tdist.init_process_group("gloo", rank=rank, world_size=2)

    def boom():
        raise OSError("disk full")

    try:
        assert dist.on_main(lambda: f"decided by rank {dist.rank()}") == "decided by rank 0"
        dist.on_main(boom)
    except Exception as e:
        results[rank] = f"{type(e).__name__}: {e}"
    tdist.destroy_process_group()


@pytest.mark.multiproc
def test_a_failure_on_rank_0_is_raised_on_every_rank():
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    results = mp.Manager().dict()
    mp.spawn(_on_main_worker, args=(free_port(), results), nprocs=2, join=True)
    assert results[0] == "OSError: disk full"
    assert results[1] == "RuntimeError: rank 0 failed: OSError: disk full"  # told, not left waiting
