"""Checkpoint completeness/rotation and non-finite loss handling, with stand-ins for the DeepSpeed
engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tstl.train.checkpoint import MARKER, Checkpointer, CheckpointError
from tstl.train.config import CheckpointConfig, TrainConfig
from tstl.train.trainer import NonFiniteLossError, Trainer


class FakeEngine:
    """Records what DeepSpeed would save/load; ``save_checkpoint`` writes the files DeepSpeed writes
    for one rank with ZeRO 1 (the model with the client state, the rank's optimizer partition),
    ``load_checkpoint`` reads both. ``partitioned=False``: ZeRO 0, the optimizer inside the model
    file (loads on any world size as it is)."""

    def __init__(self, partitioned: bool = True) -> None:
        self.partitioned = partitioned
        self.loaded: list[str] = []
        self.steps = 0
        self.backwards = 0

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict,
                        save_latest: bool) -> None:
        assert not save_latest  # we keep our own completion markers, not DeepSpeed's `latest`
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.arange(64.0)}, **client_state},
                   Path(save_dir) / tag / "mp_rank_00_model_states.pt")
        if self.partitioned:
            torch.save({"optimizer_state_dict": {"exp_avg": torch.ones(64)}},
                       Path(save_dir) / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")

    def load_checkpoint(self, load_dir: str, tag: str) -> tuple[str, dict]:
        self.loaded.append(tag)
        if self.partitioned:
            torch.load(Path(load_dir) / tag / KINDS["optimizer"], weights_only=False)
        state = torch.load(Path(load_dir) / tag / "mp_rank_00_model_states.pt", weights_only=False)
        return tag, {k: v for k, v in state.items() if k != "module"}


def _save(ck: Checkpointer, engine: FakeEngine, step: int, metric: float | None) -> str:
    return ck.save(engine, step, epoch=step // 10, client_state={"step": step},
                   rank_state={"loader": step}, metric=metric)


def test_incomplete_save_is_ignored_and_rotation_keeps_last_and_best(tmp_path: Path) -> None:
    ck, engine = Checkpointer(tmp_path, CheckpointConfig(keep_last=2)), FakeEngine()
    for step, metric in [(10, 0.2), (20, 0.9), (30, 0.4), (40, 0.5)]:
        _save(ck, engine, step, metric)
    tags = sorted(d.name for d in ck.dir.iterdir())
    # last 2 + the best (0.9 at step 20)
    assert tags == ["step-0000020", "step-0000030", "step-0000040"]
    assert ck.best() == str(ck.dir / "step-0000020")

    # a crash while saving step 50: DeepSpeed's files are there, our marker is not
    _save(ck, engine, 50, 0.1)
    (ck.dir / "step-0000050" / MARKER).unlink()
    client, ranks, world = ck.load_latest(engine)
    assert (engine.loaded == ["step-0000040"] and client == {"step": 40}
            and ranks[0]["loader"] == 40 and world == 1)

    # a marker torn mid-write is no marker either
    (ck.dir / "step-0000050" / MARKER).write_text('{"step": 5')
    assert [t for _, t, _ in ck.complete()][-1] == "step-0000040"


def test_resume_on_another_world_size_reads_every_saved_rank(tmp_path: Path) -> None:
    """Elastic resume (issue 13): all saved ranks' states come back; a missing one is named
    (tests/train/test_elastic.py runs the real thing)."""
    ck, engine = Checkpointer(tmp_path), FakeEngine(partitioned=False)
    tag = _save(ck, engine, 10, None)
    marker = ck.dir / tag / MARKER
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "world_size": 3}))
    for r in (1, 2):
        torch.save({"loader": 10 + r}, ck.dir / tag / f"rank-{r}.pt")
    resumed = ck.load_latest(engine)
    assert resumed.world_size == 3 and [s["loader"] for s in resumed.ranks] == [10, 11, 12]
    (ck.dir / tag / "rank-2.pt").unlink()
    with pytest.raises(CheckpointError, match=r"step-0000010: rank-2\.pt missing"):
        ck.load_latest(engine)


class _Engine(nn.Module):
    """A model whose output becomes NaN on demand, with DeepSpeed's backward/step surface."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.backwards = self.steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) * x.flatten(1)[:, :1]

    def backward(self, loss: torch.Tensor) -> None:
        self.backwards += 1

    def step(self) -> None:
        self.steps += 1


def test_non_finite_losses_skip_the_step_then_stop() -> None:
    trainer = object.__new__(Trainer)  # only what train_step touches
    trainer.cfg = TrainConfig(max_nonfinite=2)
    trainer.engine, trainer.device, trainer.dtype = _Engine(), torch.device("cpu"), torch.float32
    trainer.step, trainer.nonfinite = 0, 0
    good = {"video": torch.ones(2, 3), "label": torch.tensor([0, 1])}
    bad = {"video": torch.full((2, 3), float("nan")), "label": torch.tensor([0, 1])}

    assert trainer.train_step(good) is not None
    assert trainer.train_step(bad) is None and trainer.train_step(bad) is None
    # skipped, not trained
    assert (trainer.engine.backwards, trainer.engine.steps, trainer.nonfinite) == (1, 1, 2)
    with pytest.raises(NonFiniteLossError, match="more than 2"):
        trainer.train_step(bad)
    assert trainer.engine.steps == 1


# -------------------------------------------------------------------------- resume guard (issue 13)

def test_resume_refuses_a_changed_config_with_a_diff_unless_safe_or_accepted(
        tmp_path: Path) -> None:
    from tstl.core.config import ConfigError, dump_yaml
    from tstl.train import resume_guard

    old = TrainConfig(epochs=5)
    dump_yaml(old, tmp_path / "config.yaml")
    assert resume_guard.check(tmp_path / "config.yaml", TrainConfig(epochs=5), accept=False) == []
    safe = TrainConfig(epochs=8, log_every=1)
    safe.checkpoint.every_minutes = 5.0
    safe.data.num_workers = 0
    changes = resume_guard.check(tmp_path / "config.yaml", safe, accept=False)
    assert ({k for k, _, _ in changes}
            == {"epochs", "log_every", "checkpoint.every_minutes", "data.num_workers"})

    # fewer epochs is not safe: the schedule already ran past its end
    new = TrainConfig(epochs=3, log_every=1)
    new.optim.lr = 5e-4
    with pytest.raises(ConfigError) as err:
        resume_guard.check(tmp_path / "config.yaml", new, accept=False)
    msg = str(err.value)
    assert ("optim.lr: 0.001 -> 0.0005" in msg and "epochs: 5 -> 3" in msg
            and "log_every" not in msg.split("Use")[0])
    assert "checkpoint.accept_config_change=true" in msg
    assert len(resume_guard.check(tmp_path / "config.yaml", new, accept=True)) == 3


def test_resume_of_a_run_saved_before_a_key_existed(tmp_path: Path) -> None:
    """A config.yaml without a key added later (e.g. data.decoder) matches the key's default, not
    another value."""
    import yaml

    from tstl.core.config import ConfigError, dump_yaml
    from tstl.train import resume_guard

    saved = yaml.safe_load(dump_yaml(TrainConfig(epochs=5)))
    del saved["data"]["decoder"], saved["model"]["trusted_checkpoints"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert resume_guard.check(tmp_path / "config.yaml", TrainConfig(epochs=5), accept=False) == []
    other = TrainConfig(epochs=5)
    other.data.decoder = "torchcodec"
    with pytest.raises(ConfigError, match="data.decoder: '<absent>' -> 'torchcodec'"):
        resume_guard.check(tmp_path / "config.yaml", other, accept=False)


# ---------------------------------------------------------------------------- preemption (issue 13)

def test_the_checkpointer_decides_when_to_save(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 24: the cadence (steps, epochs, wall clock) and signals are the checkpointer's to
    decide."""
    import os
    import signal

    from tstl.train import checkpoint, preemption

    watch = preemption.PreemptionWatch().install()
    try:
        cadence = CheckpointConfig(every_steps=4, every_epochs=2, every_minutes=0.5)
        ck = Checkpointer(tmp_path, cadence, watch)
        assert ck.decide(3) == (False, False) and ck.decide(8) == (True, False)
        assert ck.decide(3, epoch_end=0) == (False, False)
        assert ck.decide(3, epoch_end=1) == (True, False)
        assert ck.decide(3, epoch_end=2, last=True) == (True, False)  # the end of training
        now = ck.last_save + 31
        monkeypatch.setattr(checkpoint.time, "monotonic", lambda: now)
        assert ck.decide(3) == (True, False)  # timed save, training goes on
        ck.last_save = now
        assert ck.decide(3) == (False, False)
        os.kill(os.getpid(), signal.SIGUSR1)  # only a flag is set: the process lives on
        assert ck.decide(3) == (True, True) and watch.signum == signal.SIGUSR1
        assert watch.poll(torch.device("cpu")) == (True,)
    finally:
        watch.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    off = Checkpointer(tmp_path, CheckpointConfig(every_steps=0, every_minutes=0))
    monkeypatch.setattr(checkpoint.time, "monotonic", lambda: now + 1e6)
    assert off.decide(4) == (False, False)  # 0 = no step or timed saves; an unsignalled watch


def test_handle_signals_ignores_further_signals_after_one() -> None:
    """After a signal the process is about to exit 75: a second one (``srun --kill-on-bad-exit``
    stopping the ranks that have not exited yet) must not kill it (143) on the way out, even while
    the interpreter finalizes (CPython resets Python handlers then, not SIG_IGN)."""
    import os
    import signal

    from tstl.train import preemption

    with preemption.handle_signals() as watch:
        assert preemption.active() is watch
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and preemption.active() is None
    try:
        with preemption.handle_signals() as watch:
            os.kill(os.getpid(), signal.SIGTERM)
        assert watch.signum == signal.SIGTERM
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in preemption.SIGNALS)
        os.kill(os.getpid(), signal.SIGTERM)  # would end pytest with the default action
    finally:
        watch.uninstall()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# ----------------------------------------------------------------------------------- durable
# checkpoints (issue 21)

KINDS = {"model": "mp_rank_00_model_states.pt",
         "optimizer": "zero_pp_rank_0_mp_rank_00_optim_states.pt",
         "rank state": "rank-0.pt", "marker": MARKER}


def damage(path: Path, how: str) -> None:
    """What a power cut or a bad disk leaves: the file cut short, or the same size with bytes
    changed."""
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[:len(data) // 2])
    else:
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 16]) + data[mid + 16:])


@pytest.mark.parametrize("how", ["truncate", "garble"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_damaged_newest_checkpoint_falls_back_to_the_previous(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str, how: str) -> None:
    ck, engine = Checkpointer(tmp_path, CheckpointConfig(keep_last=3)), FakeEngine()
    for step in (10, 20):
        _save(ck, engine, step, None)
    marker = json.loads((ck.dir / "step-0000020" / MARKER).read_text())
    assert set(marker["files"]) == set(KINDS.values()) - {MARKER}  # every file: size, SHA-256
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in marker["files"].values())
    damage(ck.dir / "step-0000020" / KINDS[kind], how)
    client, ranks, _ = ck.load_latest(engine)
    assert engine.loaded == ["step-0000010"] and client["step"] == 10 and ranks[0]["loader"] == 10
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert f"checkpoint {ck.dir / 'step-0000020'} is damaged" in warning
    assert (ck.dir / "damaged-step-0000020").is_dir()  # kept, aside
    assert not (ck.dir / "step-0000020").exists()
    assert [t for _, t, _ in ck.complete()] == ["step-0000010"]  # never resumed, rotated, scored
    _save(ck, engine, 20, None)  # the run goes on and saves that step anew
    assert ck.load_latest(engine).client["step"] == 20


def test_no_usable_checkpoint_names_every_damaged_folder(tmp_path: Path) -> None:
    ck, engine = Checkpointer(tmp_path), FakeEngine()
    for step in (10, 20):
        _save(ck, engine, step, None)
    damage(ck.dir / "step-0000010" / KINDS["model"], "garble")
    damage(ck.dir / "step-0000020" / KINDS["optimizer"], "truncate")
    with pytest.raises(CheckpointError) as e:
        ck.load_latest(engine)
    msg = str(e.value)
    assert f"{ck.dir / 'step-0000020'}: zero_pp_rank_0_mp_rank_00_optim_states.pt has" in msg
    garbled = f"{ck.dir / 'step-0000010'}: mp_rank_00_model_states.pt does not match its checksum"
    assert garbled in msg
    assert e.value.hint.startswith("the damaged folders were moved aside") and engine.loaded == []
    assert Checkpointer(tmp_path).load_latest(engine) is None  # a rerun starts anew


def test_a_marker_from_before_checksums_is_still_resumed(tmp_path: Path) -> None:
    ck, engine = Checkpointer(tmp_path), FakeEngine()
    tag = _save(ck, engine, 10, None)
    marker = json.loads((ck.dir / tag / MARKER).read_text())
    legacy = {k: marker[k] for k in ("step", "epoch", "metric", "world_size")}
    (ck.dir / tag / MARKER).write_text(json.dumps(legacy))
    assert ck.load_latest(engine).client["step"] == 10


def test_a_save_over_a_cut_short_one_of_the_same_step_starts_clean(tmp_path: Path) -> None:
    """A 2-rank save of step 20 killed mid-way, the run resumed on 1 rank: its step-20 save must not
    mix with the other rank's leftover partition (DeepSpeed would count it on load)."""
    ck, engine = Checkpointer(tmp_path), FakeEngine()
    stale = ck.dir / "step-0000020" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by rank 1")
    _save(ck, engine, 20, None)
    assert not stale.exists() and ck.load_latest(engine).client["step"] == 20
