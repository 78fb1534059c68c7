"""The training loop: build -> resume -> {train epoch, validate, checkpoint} -> multi-view test
-> report."""

from __future__ import annotations

import json
import logging
import random
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from tqdm import tqdm

from tstl.core.config import dump_yaml, to_dict
from tstl.data import build_eval_loader, build_train_loader
from tstl.data.seeds import derive_seed
from tstl.models.checkpoint import StateDictAdapter
from tstl.train import dist, perf, preemption, resume_guard
from tstl.train import engine as eng
from tstl.train.build import build_model, compute_dtype
from tstl.train.checkpoint import Checkpointer, rng_state, set_rng_state
from tstl.train.config import TrainConfig
from tstl.train.ds_config import BatchPlan, deepspeed_config
from tstl.train.evaluate import EvalResult, evaluate, save_report
from tstl.train.metrics import MetricsSink
from tstl.train.preemption import Preempted, PreemptionWatch
from tstl.train.waits import note_waits

logger = logging.getLogger(__name__)

class NonFiniteLossError(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Owns the engine, loaders, checkpointer and metrics of one run; ``train()``
    resumes automatically.

    Args:
        cfg: the run.
        label_map: relabelling handed to the train and validation loaders (``build_train_loader``):
            samples whose label is not a key are dropped, the others become ``label_map[y]``. Kept
            in ``<out_dir>/labels.json``.
        weight_adapters: state-dict adapters applied when ``cfg.model.init`` checkpoints
            load (``build_model``).
    """

    def __init__(self, cfg: TrainConfig, *, label_map: Mapping[int, int] | None = None,
                 weight_adapters: Sequence[StateDictAdapter] = ()) -> None:
        self.cfg = cfg
        self.label_map = dict(label_map) if label_map is not None else None
        # SIGTERM/SIGUSR1 only set a flag from here on (issue 13, 21): the command's watch
        # (handle_signals, installed before anything else by the CLIs), or one of our own for
        # library use
        self._own_watch = preemption.active() is None
        self.watch = preemption.active() or PreemptionWatch().install()
        self.device = dist.init()
        if self.device.type == "cpu":
            # Denormal floats (values below ~1e-38, e.g. from softmax/GELU tails once training moves
            # the zero-initialised adapters) are 10-20x slower on x86 CPUs; flushing them to zero
            # changes nothing else.
            torch.set_flush_denormal(True)
        self.run_dir = Path(cfg.out_dir)
        self.dtype = compute_dtype(cfg.engine.precision, self.device)
        seed_everything(cfg.seed)  # same model init on every rank
        self.train_loader = build_train_loader(cfg.data, cfg.shard_dir(cfg.train_split),
                                               rank=dist.rank(), world_size=dist.world(),
                                               label_map=self.label_map)
        # batch-level augmentation (normalisation, erasing, mixup; RandAugment too with
        # data.augment_on=device) runs where the model is; workers hand over uint8 clips
        self.train_loader.to(self.device)
        num_classes = cfg.model.num_classes or self.train_loader.num_classes
        if not num_classes:
            raise ValueError(
                "model.num_classes is 0 and the shard set has no shards.json to take it from")
        self.num_classes, self.classes = num_classes, self.train_loader.classes
        model, provenance = build_model(cfg.model, num_classes, weight_adapters)
        # issue 13: resuming with a changed config is refused; rank 0 decides, every rank raises
        dist.on_main(lambda: Checkpointer(self.run_dir).complete() and resume_guard.check(
            self.run_dir / "config.yaml", cfg, cfg.checkpoint.accept_config_change))
        self._log_start(model, provenance)
        self.plan = BatchPlan(cfg.data.batch_size, cfg.engine.accum_steps, dist.world())
        self.steps_per_epoch = max(1, len(self.train_loader) // cfg.engine.accum_steps)
        lr, min_lr = self.plan.scaled(cfg.optim.lr), self.plan.scaled(cfg.optim.min_lr)
        optimizer = eng.build_optimizer(eng.param_groups(model, cfg.optim), cfg.optim, lr)
        sched = lambda opt: eng.build_scheduler(opt, cfg.optim, lr, min_lr,  # noqa
                                                self.steps_per_epoch, cfg.epochs)
        ds_config = deepspeed_config(cfg.engine, cfg.optim.clip_grad, self.plan)
        logger.info("batch: %d per rank x %d accumulation x %d ranks = %d; lr %.3g (= %.3g x %d / "
                    "256); %d optimizer steps per epoch", self.plan.micro_batch,
                    self.plan.accum_steps, self.plan.world_size, self.plan.total, lr, cfg.optim.lr,
                    self.plan.total, self.steps_per_epoch)
        with note_waits("DeepSpeed's initialisation"):  # it may JIT-build ops under a file lock
            self.engine, self.scheduler = eng.initialize(model, optimizer, sched, ds_config)
        self._fresh_schedule = self.scheduler.state_dict()  # this layout's base lrs (elastic)
        # the checkpointer decides when to save (cadence, wall clock, signals) and owns the saved
        # files
        self.ckpt = Checkpointer(self.run_dir, cfg.checkpoint, self.watch, self.device)
        self.sink = MetricsSink(self.run_dir)
        self.step = self.epoch = self.nonfinite = 0
        self.criterion_soft = SoftTargetCrossEntropy()
        self.perf = self._count_flops(model) if dist.is_main() else None

    def _count_flops(self, model: nn.Module) -> dict | None:
        """Model FLOPs per training clip (tstl/train/perf.py: counted on a meta copy) and the
        device's peak."""
        counted = perf.count_on_meta(
            lambda: build_model(replace(self.cfg.model, init=[], grad_checkpointing=False),
                                self.num_classes)[0],
            (3, model.num_frames, model.img_size, model.img_size))
        if counted is None:
            return None
        name = perf.device_name(self.device)
        peak = perf.peak_flops(name, self.cfg.engine.precision)
        logger.info("model FLOPs per clip: %.3g forward, %.3g forward+backward (training); %s%s",
                    counted[0], counted[1], name,
                    (f", dense peak {peak / 1e12:.1f} TFLOP/s" if peak
                     else " (no known peak: no MFU)"))
        info = {"forward_flops_per_clip": counted[0], "train_flops_per_clip": counted[1],
                "peak_flops": peak, "device": name, "precision": self.cfg.engine.precision}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # report.md's throughput section
        (self.run_dir / "perf.json").write_text(json.dumps(info, indent=1))
        return info

    def _log_start(self, model: nn.Module, provenance: list[str]) -> None:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        logger.info("model %s: %s trainable, %s frozen parameters, %s classes", self.cfg.model.name,
                    f"{trainable:,}", f"{frozen:,}", self.num_classes)
        for line in provenance:
            logger.info("weights: %s", line)
        if dist.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(self.cfg, self.run_dir / "config.yaml")
            # what the config no longer says: the labels this run was trained on
            if self.label_map is not None:
                (self.run_dir / "labels.json").write_text(json.dumps(
                    {"label_map": {str(k): v for k, v in self.label_map.items()}}, indent=1))

    # ------------------------------------------------------------------------------------- state

    def _client_state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "nonfinite": self.nonfinite,
                "config": to_dict(self.cfg), "batches_per_epoch": len(self.train_loader),
                "world_size": dist.world(), "accum_steps": self.cfg.engine.accum_steps}

    def _rank_state(self) -> dict:
        return {"loader": self.train_loader.state_dict(), "rng": rng_state()}

    def resume(self) -> bool:
        """Restore the newest complete checkpoint, saved by any number of ranks; False when there
        is none.

        Same layout (ranks, workers, batch size): the very next batch and step, RNG states included
        (the same trajectory as an uninterrupted run). Another layout (elastic resume,
        docs/training.md): the loader goes on with the samples of the epoch the saved job had not
        consumed, ``step`` becomes this layout's step at that point of the epoch, the lr schedule is
        set to that step (``_continue_schedule``) and the RNGs are seeded from (seed, step, rank).
        """
        loaded = self.ckpt.load_latest(self.engine)
        if loaded is None:
            return False
        client, ranks, saved_world = loaded
        self.epoch, self.nonfinite = client["epoch"], client["nonfinite"]
        accum = self.cfg.engine.accum_steps
        exact = self.train_loader.load_state_dicts([r["loader"] for r in ranks])
        if exact and client.get("accum_steps", accum) == accum:
            self.step = client["step"]
            set_rng_state(ranks[dist.rank()]["rng"])
            return True
        self.step = self.epoch * len(self.train_loader) + self.train_loader.step
        seed_everything(derive_seed(self.cfg.seed, self.step, dist.rank(), 0xE1A5))
        self._continue_schedule(self.step // accum)
        logger.info("elastic resume: %d ranks saved at step %d (%d batches per epoch); %d ranks go "
                    "on at step %d of %d (epoch %d), lr %.3g", saved_world, client["step"],
                    client.get("batches_per_epoch", 0), dist.world(), self.step,
                    len(self.train_loader), self.epoch, self.engine.get_lr()[0])
        return True

    def _continue_schedule(self, opt_step: int) -> None:
        """Put the lr schedule at optimizer step ``opt_step`` of this layout, with this
        layout's peak lr.

        The loaded scheduler state carries the saved job's step count and base lrs (its peak lr,
        scaled by its total batch); the state is loaded again with this layout's base lrs
        (``optim.lr * total batch / 256`` times each group's layer-decay scale, from the scheduler
        as built for this layout) and one step before ``opt_step``, and one ``step()`` sets every
        group's lr = base x schedule factor at ``opt_step`` (warm-up and cosine counted in this
        layout's steps). DeepSpeed's own counters follow (its step-keyed features: the flops
        profiler's ``profile_step``, monitors); the engine has no state_dict for them.
        """
        state = self.scheduler.state_dict()
        self.scheduler.load_state_dict({**state, "base_lrs": self._fresh_schedule["base_lrs"],
                                        "last_epoch": opt_step - 1})
        self.scheduler.step()
        self.engine.global_steps = opt_step
        self.engine.global_samples = opt_step * self.plan.total

    def save(self, metric: float | None = None) -> None:
        self.ckpt.save(self.engine, self.step, self.epoch, self._client_state(), self._rank_state(),
                       metric)

    def _safe_point(self, *, step: bool = False, epoch_end: bool = False,
                    metric: float | None = None) -> None:
        """Collective, where the run may save and stop: after an optimizer step (``step``), at an
        epoch's end after its validation (``epoch_end``), else before the first step or between test
        batches (stop only: the state on disk is already the run's). The checkpointer decides
        whether to save; a signal then ends the run with ``Preempted``, raised here only
        (docs/training.md, "Preemption": what happens in each phase)."""
        if step or epoch_end:
            last = epoch_end and self.epoch + 1 == self.cfg.epochs
            save, stop = self.ckpt.decide(self.step, epoch_end=self.epoch if epoch_end else None,
                                          last=last)
            if save:
                self.save(metric)
                stop = stop or self.watch.poll(self.device)[0]  # a signal during the save
        else:
            stop = self.watch.poll(self.device)[0]
        if stop:
            raise Preempted(self.watch.signum or signal.SIGTERM, self.step)

    # ------------------------------------------------------------------------------------- training

    def loss(self, logits: torch.Tensor | dict[str, torch.Tensor],
             label: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy with label smoothing, or against mixup's soft targets (smoothing folded
        in); a multi-head model's is the sum over its heads, each smoothed over its own classes
        (CAST ``engine_for_compomodel.py:14-19``: noun loss + verb loss)."""
        if isinstance(logits, dict):
            if not isinstance(label, dict) or set(label) != set(logits):
                raise ValueError(f"the model's heads {sorted(logits)} need one label each, got "
                                 f"{sorted(label) if isinstance(label, dict) else 'one label'}")
            losses = [self.loss(logits[h], label[h]) for h in logits]
            return torch.stack(losses).sum()
        logits = logits.float()
        if label.dtype.is_floating_point:  # mixup/cutmix soft targets (label smoothing folded in)
            return self.criterion_soft(logits, label)
        return F.cross_entropy(logits, label, label_smoothing=self.cfg.data.label_smoothing)

    def train_step(self, batch: dict) -> float | None:
        """One micro-batch; returns the loss, or None when it was not finite (the step
        is skipped)."""
        video = batch["video"].to(self.device, dtype=self.dtype, non_blocking=True)
        label = batch["label"]  # a tensor, or head -> tensor for a multi-head shard set
        if isinstance(label, dict):
            label = {h: y.to(self.device, non_blocking=True) for h, y in label.items()}
        else:
            label = label.to(self.device, non_blocking=True)
        loss = self.loss(self.engine(video), label)
        if dist.any_true(not torch.isfinite(loss).item(), self.device):
            self.nonfinite += 1
            logger.warning("non-finite loss at step %d (%d so far): batch skipped", self.step,
                           self.nonfinite)
            if self.nonfinite > self.cfg.max_nonfinite:
                raise NonFiniteLossError(f"more than {self.cfg.max_nonfinite} non-finite losses; "
                                         "lower the lr or check the data (see the quarantine list)")
            return None
        self.engine.backward(loss)
        self.engine.step()
        return loss.item()

    def train_epoch(self) -> None:
        loader, cfg = self.train_loader, self.cfg
        if loader.epoch != self.epoch or loader.step >= len(loader):
            loader.set_epoch(self.epoch)
        bar = tqdm(total=len(loader), initial=loader.step, desc=f"epoch {self.epoch}",
                   disable=not dist.is_main(), dynamic_ncols=True)
        wait = busy = 0.0
        step_s = None  # recent seconds per micro-batch (moving average): the whole-run ETA
        window = [0, 0.0]  # clips and seconds since the last logged step: achieved FLOP/s
        t0 = time.perf_counter()
        for batch in loader:
            t1 = time.perf_counter()
            loss = self.train_step(batch)
            t2 = time.perf_counter()
            wait, busy = wait + (t1 - t0), busy + (t2 - t1)
            self.step = loader.step + self.epoch * len(loader)
            lr = self.engine.get_lr()[0] if self.engine.get_lr() else 0.0
            clips_s = len(batch["key"]) * dist.world() / max(t2 - t0, 1e-9)
            step_s = t2 - t0 if step_s is None else 0.95 * step_s + 0.05 * (t2 - t0)
            window = [window[0] + len(batch["key"]), window[1] + (t2 - t0)]
            # micro-batches left in the run (validation not counted)
            left = cfg.epochs * len(loader) - self.step
            bar.set_postfix(loss=f"{loss:.4f}" if loss is not None else "nan", lr=f"{lr:.2e}",
                            clips_s=f"{clips_s:.1f}", wait=f"{wait / max(wait + busy, 1e-9):.0%}",
                            run_eta=tqdm.format_interval(left * step_s))
            bar.update(1)
            if loss is not None and self.step % cfg.log_every == 0:
                self.sink.log(self.step,
                              {"train/loss": loss, "train/lr": lr, "train/clips_per_s": clips_s,
                                          "train/data_wait": wait / max(wait + busy, 1e-9),
                                          **self._perf_scalars(*window)}, epoch=self.epoch)
                window = [0, 0.0]
            # Saves only between optimizer steps: DeepSpeed's checkpoint holds no partially
            # accumulated gradients. micro_steps counts the micro-batches DeepSpeed stepped,
            # identically on every rank. The epoch's last step is decided at its end, after
            # validation.
            if self.engine.micro_steps % self.plan.accum_steps == 0 and loader.step < len(loader):
                try:
                    self._safe_point(step=True)
                except Preempted:
                    bar.close()
                    raise
            t0 = time.perf_counter()
        bar.close()

    def _perf_scalars(self, clips: int, seconds: float) -> dict[str, float]:
        """Achieved model FLOP/s of this rank (= per device) and MFU over the last
        logging window."""
        if self.perf is None or seconds <= 0:
            return {}
        achieved = self.perf["train_flops_per_clip"] * clips / seconds
        return {"perf/achieved_flops": achieved,
                **({"perf/mfu": achieved / self.perf["peak_flops"]} if self.perf["peak_flops"]
                   else {})}

    def validate(self, views: tuple[int, int], desc: str = "validate",
                 interruptible: bool = False) -> EvalResult:
        """Evaluate on ``val_split``; ``interruptible``: a signal stops it between batches (the
        final test, whose state is saved already: the rerun tests again). The per-epoch validation
        runs to its end; a signal during it is handled at the epoch's end, where the save it asked
        for carries the metric."""
        loader = build_eval_loader(self.cfg.data, self.cfg.shard_dir(self.cfg.val_split),
                                   rank=dist.rank(), world_size=dist.world(), views=views,
                                   label_map=self.label_map).to(self.device)
        batches = _Interruptible(loader, self._safe_point, self.device) if interruptible else loader
        return evaluate(self.engine.module, batches, self.device, self.num_classes, self.dtype,
                        self.cfg.test_merge, desc)

    def train(self) -> EvalResult | None:
        """Resume if a checkpoint exists, train the remaining epochs, test; returns the final
        test result."""
        if self.resume() and self.train_loader.step >= len(self.train_loader):
            self.epoch += 1  # the checkpoint was taken at the end of an epoch
        self._safe_point()  # a signal during start-up: nothing new to save
        while self.epoch < self.cfg.epochs:
            self.train_epoch()
            metric = None
            if self.cfg.val_every and (self.epoch + 1) % self.cfg.val_every == 0:
                res = self.validate((1, 1), f"validate epoch {self.epoch}")
                metric = res.top1
                self.sink.log(self.step, {"val/top1": res.top1, "val/top5": res.top5},
                              epoch=self.epoch)
                logger.info("epoch %d: single-view val top-1 %.4f top-5 %.4f (%d videos)",
                            self.epoch, res.top1, res.top5, res.videos)
            self._safe_point(epoch_end=True, metric=metric)
            self.epoch += 1
        return self.test() if self.cfg.test_at_end else None

    def test(self) -> EvalResult:
        views = tuple(self.cfg.data.test_views)
        res = self.validate(views, f"test {views[0]}x{views[1]} views", interruptible=True)
        logger.info("multi-view test (%d x %d views): top-1 %.4f top-5 %.4f mean class acc %.4f "
                    "(%d videos)",
                    *views, res.top1, res.top5, res.summary()["mean_class_acc"], res.videos)
        if dist.is_main():
            save_report(res, self.run_dir / "test", self.classes)
        self.sink.log(self.step, {"test/top1": res.top1, "test/top5": res.top5})
        return res

    def close(self) -> None:
        if hasattr(self, "sink"):
            self.sink.close()
        if self._own_watch:
            self.watch.uninstall()


class _Interruptible:
    """An evaluation loader whose iteration calls ``check`` (collective) before every batch that all
    ranks have.

    Ranks may hold different numbers of batches; one all-reduce at the start finds the count all
    share, and only those batches are preceded by the check, so every rank takes part in every
    check.
    """

    def __init__(self, loader, check, device: torch.device) -> None:
        self.loader, self.check, self.device = loader, check, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        # the fewest batches of any rank
        shared = int(-dist.all_max([-float(len(self.loader))], self.device)[0])
        for i, batch in enumerate(self.loader):
            if i < shared:
                self.check()
            yield batch


