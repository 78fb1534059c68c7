"""Elastic resume (issue 13): a run checkpointed on N ranks resumes on M ranks.

Loader: the keys emitted before the save (N ranks) and after the resume (M ranks) of one epoch
together are the epoch's samples, none in both but the padding (which wraps to the start of the
epoch's order). Trainer: 2 -> 1 and 1 -> 2 ranks with ZeRO 0 and 1 (gloo, CPU, bcast_test): model
and optimizer state restored exactly, step counter and lr schedule continued by the documented
rule.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, TINY, Leaks, subprocess_env
from tests.data.conftest import make_mp4, sample, write_shardset
from tstl.data import DataConfig, build_train_loader

# ------------------------------------------------------------------------------------------- loader

CFG = {"num_frames": 4, "input_size": 32, "batch_size": 2, "num_workers": 2, "mixup": 0.0,
       "cutmix": 0.0, "min_bad_check": 1000}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """27 samples in uneven shards (27 does not divide: the padding rule is in play)."""
    d = tmp_path_factory.mktemp("elastic-shards")
    vids = {n: make_mp4(d / f"v{n}.mp4", n, n * 7) for n in (12, 20)}
    items = [sample(f"v{i:03d}", i % 5, vids[(12, 20)[i % 2]], (12, 20)[i % 2]) for i in range(27)]
    return write_shardset(d / "set", items, [5, 13, 9])


def _cfg(**kw) -> DataConfig:
    c = {**CFG, **kw}
    if c["num_workers"] == 1:
        c["num_workers"] = 0  # the same single role, in-process (cheaper)
    return DataConfig(**c)


def _job(root: Path, world: int, c: DataConfig, states: list[dict] | None = None,
         stop: int | None = None, epoch: int = 1) -> tuple[list[list[str]], list[dict], list[int]]:
    """Every rank of a job: keys emitted (until step ``stop``), final states, batches per rank."""
    keys, out, counts = [], [], []
    for r in range(world):
        ld = build_train_loader(c, root, rank=r, world_size=world, epoch=epoch)
        if states is not None:
            ld.load_state_dicts(states)
        got, n = [], 0
        for batch in ld:
            got += batch["key"]
            n += 1
            if stop is not None and ld.step == stop:
                break
        keys.append(got)
        out.append(ld.state_dict())
        counts.append(n)
        assert stop is not None or ld.step == len(ld)
    return keys, out, counts


def _flat(keys: list[list[str]]) -> Counter:
    return Counter(k for ks in keys for k in ks)


ALL = {f"v{i:03d}" for i in range(27)}


@pytest.mark.parametrize("saved, now",
                         [((2, 2), (1, 2)), ((1, 2), (2, 2)), ((2, 2), (3, 1)), ((1, 1), (2, 2))])
def test_the_epoch_continues_on_another_layout_without_repeats_or_gaps(
        shards: Path, saved, now) -> None:
    (n, wn), (m, wm) = saved, now
    before, states, _ = _job(shards, n, _cfg(num_workers=wn), stop=3)
    after, _, counts = _job(shards, m, _cfg(num_workers=wm), states)
    b, a = _flat(before), _flat(after)
    assert set(b) | set(a) == ALL  # none skipped
    assert len(set(counts)) == 1  # every new rank the same number of steps
    # the only repeats are the padding, fewer than one batch per new rank, taken from the start of
    # the order
    assert 0 <= sum(a.values()) + sum(b.values()) - 27 < m * 2
    assert sum(b.values()) == n * 3 * 2 and max(b.values()) == max(a.values()) == 1


def test_twice_elastic_and_the_same_layout_stays_exact(shards: Path) -> None:
    c = _cfg()
    before, states, _ = _job(shards, 2, c, stop=2)
    # 2x2 -> 1x1, saved again
    middle, states2, _ = _job(shards, 1, _cfg(num_workers=1), states, stop=9)
    after, _, _ = _job(shards, 3, _cfg(num_workers=1), states2)  # -> 3x1
    b, mid, a = _flat(before), _flat(middle), _flat(after)
    assert set(b) | set(mid) | set(a) == ALL
    # only the padding repeats
    assert not (set(b) & set(mid)) and 0 <= sum((b + mid + a).values()) - 27 < 3 * 2

    # the same layout through load_state_dicts: exactly the uninterrupted epoch (same batches, same
    # order)
    full, _, _ = _job(shards, 2, c)
    resumed, _, _ = _job(shards, 2, c, states)
    assert [bf + af for bf, af in zip(before, resumed)] == full
    # the plan survives an exact resume too: 1x1 saved after an elastic resume, resumed on 1x1
    again, _, _ = _job(shards, 1, _cfg(num_workers=1), states2)
    rest, _, _ = _job(shards, 1, _cfg(num_workers=1), states)
    assert middle[0] + again[0] == rest[0]


def test_bad_samples_are_not_read_again_and_drop_stays_drop(shards: Path, tmp_path: Path) -> None:
    vid = make_mp4(tmp_path / "v.mp4", 12, 3)
    items = [sample(f"g{i:02d}", i % 5, vid, 12) for i in range(14)]
    c = _cfg(num_workers=0, max_bad_fraction=0.9)
    # the epoch's order does not depend on the data's bytes: break the samples at positions 1, 6
    # (read before the save, which comes after 2 ranks x 2 steps x 2 = 8 positions) and 11 (after
    # it)
    order = [k for batch in build_train_loader(c, write_shardset(tmp_path / "good", items, [7, 7]),
                                               epoch=1)
             for k in batch["key"]]
    broken = {order[i] for i in (1, 6, 11)}
    items = [{**it, "mp4": b"\0" * 2000} if it["__key__"] in broken else it for it in items]
    root = write_shardset(tmp_path / "bad", items, [7, 7])
    q = tmp_path / "quarantine.txt"
    c = _cfg(num_workers=0, quarantine=str(q), max_bad_fraction=0.9)
    before, states, _ = _job(root, 2, c, stop=2)
    assert (sorted(line.split("\t")[0] for line in q.read_text().splitlines())
            == sorted(broken - {order[11]}))
    after, _, _ = _job(root, 1, c, states)
    bad = [line.split("\t")[0] for line in q.read_text().splitlines()]
    assert sorted(bad) == sorted(broken)  # each found bad once, before or after the resume
    good = {f"g{i:02d}" for i in range(14)} - set(bad)
    assert (set(_flat(before)) | set(_flat(after)) == good
            and not set(_flat(before)) & set(_flat(after)))
    # a bad one's place: a good one of its batch
    assert sum((_flat(before) + _flat(after)).values()) == 14

    # balance="drop": the remainder is rounded down too; nothing is repeated, nothing seen twice
    keys_b, states = [], []
    for r in range(2):
        ld = build_train_loader(_cfg(), shards, rank=r, world_size=2, balance="drop")
        got = []
        for batch in ld:
            got += batch["key"]
            if ld.step == 2:
                break
        keys_b += got
        states.append(ld.state_dict())
    ld = build_train_loader(_cfg(num_workers=0), shards, rank=0, world_size=1, balance="drop")
    ld.load_state_dicts(states)
    keys_a = [k for batch in ld for k in batch["key"]]
    assert (not set(keys_b) & set(keys_a) and len(set(keys_a)) == len(keys_a)
            and len(set(keys_b)) == len(keys_b))
    assert len(keys_a) % 2 == 0 and len(keys_b) + len(keys_a) > 27 - 2 * 2 * 2


def test_a_different_seed_or_shard_set_is_refused(shards: Path) -> None:
    _, states, _ = _job(shards, 2, _cfg(), stop=2)
    ld = build_train_loader(_cfg(seed=5), shards, rank=0, world_size=1)
    with pytest.raises(ValueError, match="seed"):
        ld.load_state_dicts(states)
    with pytest.raises(ValueError, match="shuffle_block"):
        build_train_loader(_cfg(shuffle_block=1), shards, rank=0,
                           world_size=1).load_state_dicts(states)
    # one rank's state is enough: every rank is at the same position of the order
    assert (build_train_loader(_cfg(), shards, rank=0, world_size=1).load_state_dict(states[1])
            is False)
    assert (build_train_loader(_cfg(), shards, rank=1, world_size=2).load_state_dict(states[0])
            is True)
    # written by 0.2 (slot-based partition)
    old = {k: v for k, v in states[0].items() if k != "position"}
    with pytest.raises(ValueError, match="before 0.3"):
        build_train_loader(_cfg(), shards, rank=0, world_size=2).load_state_dict(old)


# ------------------------------------------------------------------------------------------ trainer

CONFIGS = [str(ROOT / "configs/data/ssv2.yaml"), str(ROOT / "configs/demo.yaml")]


def _overrides(data_dir: Path, run: Path, zero: int) -> list[str]:
    return [f"data_dir={data_dir}", f"out_dir={run}", "epochs=1", f"engine.zero_stage={zero}",
            *TINY, "val_every=0", "test_at_end=false", "checkpoint.every_steps=2",
            "checkpoint.keep_last=5"]


def _train(world: int, data_dir: Path, run: Path, zero: int,
           leaks: Leaks) -> subprocess.CompletedProcess:
    """One launch; ``leaks`` checks at the test's end that it left nothing behind (issue 21)."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world),
           "--master_port", leaks.port(),
           "--module", "tstl.train.cli", "train", "--config", *CONFIGS,
           *_overrides(data_dir, run, zero)]
    proc = subprocess.run(cmd, cwd=ROOT, env=leaks.env(), capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _keep_only(run: Path, tag: str) -> None:
    """Turn a finished run into one that stopped right after saving ``tag`` (later tags and rows
    removed)."""
    ck = run / "checkpoints"
    for d in ck.iterdir():
        if d.is_dir() and d.name.startswith("step-") and d.name > tag:
            shutil.rmtree(d)
    step = int(tag.removeprefix("step-"))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(run)
                                               if r["step"] <= step))


def _probe(data_dir: str, run: str, zero: int) -> None:
    """Run in a child process (1 rank): build the trainer, resume, and print what it restored as
    JSON."""
    import torch

    from tstl.core.config import load_cli_config
    from tstl.train.config import TrainConfig
    from tstl.train.trainer import Trainer

    cfg = load_cli_config(TrainConfig, CONFIGS, _overrides(Path(data_dir), Path(run), zero))
    trainer = Trainer(cfg)
    assert trainer.resume()
    tag = max((Path(run) / "checkpoints").glob("step-*"))
    saved = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    module = dict(trainer.engine.module.named_parameters())
    same_weights = all(torch.equal(v, saved["module"][k]) for k, v in module.items())
    opt = trainer.engine.optimizer
    if zero == 0:
        want = saved["optimizer"]["state"]
        got = opt.state_dict()["state"]
        same_optim = all(torch.equal(got[i][k], want[i][k]) for i in want
                         for k in ("exp_avg", "exp_avg_sq"))
        compared = len(want)
    else:
        # the saved ranks' flat partitions, concatenated, are this single rank's whole flat groups
        parts = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
                 for f in sorted(tag.glob("zero_pp_rank_*_optim_states.pt"))]
        same_optim, compared = True, 0
        for g, flat in enumerate(opt.single_partition_of_fp32_groups):
            n = sum(p.numel() for p in opt.bit16_groups[g])
            old = torch.cat([p["single_partition_of_fp32_groups"][g] for p in parts])[:n]
            same_optim &= torch.equal(flat[:n], old)
            for key in ("exp_avg", "exp_avg_sq"):
                # padded
                old = torch.cat([p["base_optimizer_state"]["state"][g][key] for p in parts])[:n]
                same_optim &= torch.equal(opt.optimizer.state[flat][key][:n], old)
                compared += 1
    print("PROBE " + json.dumps({"weights": same_weights, "optim": bool(same_optim),
                                 "compared": compared, "step": trainer.step, "epoch": trainer.epoch,
                                 "loader_step": trainer.train_loader.step,
                                 "len": len(trainer.train_loader),
                                 "last_epoch": trainer.scheduler.last_epoch,
                                 "lrs": [g["lr"] for g in trainer.scheduler.optimizer.param_groups],
                                 "scales": [g.get("lr_scale", 1.0)
                                            for g in trainer.scheduler.optimizer.param_groups]}))
    trainer.close()


def _expected_lr(step: int, world: int, steps_per_epoch: int) -> float:
    """The documented rule: this layout's peak lr (optim.lr x total batch / 256), schedule at this
    layout's step."""
    from tstl.train import engine as eng

    optim = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())["optim"]  # batch 2 per rank
    lr, min_lr = optim["lr"] * 2 * world / 256, optim["min_lr"] * 2 * world / 256
    return lr * eng.lr_factor(step, lr=lr, min_lr=min_lr, warmup_steps=2 * steps_per_epoch,
                              total_steps=steps_per_epoch)


@pytest.mark.multiproc
@pytest.mark.parametrize("zero", [0, 1])
def test_two_ranks_resume_on_one(data_dir: Path, tmp_path: Path, zero: int, leaks: Leaks) -> None:
    run = tmp_path / "run"
    _train(2, data_dir, run, zero, leaks)  # 12 clips / (2 ranks x 2) = 3 steps; saved at 2 and 3
    _keep_only(run, "step-0000002")  # as if preempted right after step 2: 8 clips seen, 4 left
    code = ("import sys; from tests.train.test_elastic import _probe; "
            "_probe(sys.argv[1], sys.argv[2], int(sys.argv[3]))")
    probe = subprocess.run([sys.executable, "-c", code, str(data_dir), str(run), str(zero)],
                           cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                           timeout=600, check=False)
    assert probe.returncode == 0, probe.stderr[-3000:]
    got = json.loads(probe.stdout[probe.stdout.index("PROBE ") + 6:].splitlines()[0])
    assert got["weights"] and got["optim"] and got["compared"] > 0
    # 1 rank: 6 steps per epoch; 4 clips left = 2 batches, so it goes on at step 4 of 6 (2 of 3
    # before)
    assert ((got["epoch"], got["loader_step"], got["len"], got["step"], got["last_epoch"])
            == (0, 4, 6, 4, 4))
    assert got["lrs"] == pytest.approx([_expected_lr(4, 1, 6) * s for s in got["scales"]], rel=1e-9)

    kept = len(_rows(run))
    proc = _train(1, data_dir, run, zero, leaks)
    assert "elastic resume" in proc.stderr
    rows = {r["step"]: r for r in _rows(run)[kept:] if "train/loss" in r}
    assert sorted(rows) == [5, 6]  # steps 5-6 of the 1-rank epoch
    assert rows[5]["train/lr"] == pytest.approx(_expected_lr(5, 1, 6), rel=1e-6)
    marker = json.loads((run / "checkpoints/step-0000006/complete.json").read_text())
    assert marker["world_size"] == 1


@pytest.mark.multiproc
@pytest.mark.parametrize("zero", [0, 1])
def test_one_rank_resumes_on_two(data_dir: Path, tmp_path: Path, zero: int, leaks: Leaks) -> None:
    run = tmp_path / "run"
    _train(1, data_dir, run, zero, leaks)  # 6 steps of 2 clips; saved at steps 2, 4, 6
    _keep_only(run, "step-0000004")  # 8 clips seen, 4 left
    kept = len(_rows(run))
    proc = _train(2, data_dir, run, zero, leaks)
    assert "elastic resume" in proc.stderr
    rows = {r["step"]: r for r in _rows(run)[kept:] if "train/loss" in r}
    # 2 ranks: 3 steps per epoch; 4 clips left = 1 batch per rank, so it goes on at step 2 of 3
    assert sorted(rows) == [3]
    assert rows[3]["train/lr"] == pytest.approx(_expected_lr(3, 2, 3), rel=1e-6)
    assert (json.loads((run / "checkpoints/step-0000003/complete.json").read_text())["world_size"]
            == 2)
