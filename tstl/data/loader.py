"""``ShardLoader``: the canonical partition of an epoch, read by range, with equal steps on every
rank, batch stages on the device and resume on any layout."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence

import torch
from timm.data import Mixup
from torch.utils.data import DataLoader

from tstl.core.transport import ReadPolicy, orphan_guard
from tstl.data import partition
from tstl.data.buffers import BUFFERS_EXTRA, Returns, check_room
from tstl.data.config import DataConfig
from tstl.data.decode import check_decoder
from tstl.data.device import BatchStage, MultiHeadMixup, build_stages, stage_seed
from tstl.data.reader import ShardSetChanged
from tstl.data.sources import ShardList, changed, resolve
from tstl.data.stream import LOOKAHEAD, BadSampleRateError, ClipStream, StreamSpec

logger = logging.getLogger(__name__)

__all__ = ["BadSampleRateError", "ShardLoader", "build_eval_loader", "build_train_loader"]

Source = str | os.PathLike | Sequence[str] | ShardList


class ShardLoader:
    """Batches of one rank for one epoch at a time; see ``docs/loader.md`` for the guarantees.

    Args:
        cfg: loader configuration.
        shardset: resolved shards (``sources.resolve``).
        train: training (shuffle, augmentation, mixup) or evaluation (multi-view, deterministic).
        rank, world_size: this process' place in the job.
        epoch: the epoch the next iteration produces.
        views: evaluation views (temporal T, spatial C).
        balance: ``pad`` (default) or ``drop``, the rule that makes all ranks' step counts equal
            (``partition.steps_per_rank``).
        label_map: relabelling ``y -> label_map[y]``; samples whose label is not a key are not in
            ``shardset`` (``resolve(..., labels=label_map.keys())``). None keeps the labels.
    """

    def __init__(self, cfg: DataConfig, shardset: ShardList, *, train: bool, rank: int = 0,
                 world_size: int = 1, epoch: int = 0, views: tuple[int, int] = (1, 1),
                 balance: str = "pad", label_map: Mapping[int, int] | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if balance not in ("pad", "drop"):
            raise ValueError(f"balance must be pad or drop, got {balance!r}")
        check_decoder(cfg.decoder)  # here, not as a bad sample in every worker
        if label_map is not None and shardset.heads:
            raise ValueError(f"label_map relabels one-label shard sets; this one has the heads "
                             f"{', '.join(shardset.heads)}")
        self.cfg, self.shardset, self.train = cfg, shardset, train
        self.rank, self.world_size, self.views = rank, world_size, tuple(views)
        self.workers = max(1, cfg.num_workers)
        self.label_map = _check_label_map(label_map, shardset.num_classes)
        self.drop = balance == "drop"
        self.length = self._steps()
        if self.length == 0:
            raise ValueError(
                f"{self.num_samples} samples cannot fill one batch of {cfg.batch_size} on each of "
                f"{world_size} rank(s); lower data.batch_size, or use balance=pad")
        self.mixup = self._mixup() if train and cfg.mixup_active else None
        self.device = torch.device("cpu")
        self.bad_samples = 0
        # this process' counts for the bad-sample limit (_check_bad)
        self._bad_run = self._seen_run = 0
        self._room_checked = False  # /dev/shm size warned about at most once
        self.set_epoch(epoch)

    def _steps(self) -> int:
        """Batches per epoch on every rank: from the sample count alone, so all ranks agree without
        talking."""
        c, n = self.cfg, self.num_samples
        if self.train:
            return partition.steps_per_rank(n, self.world_size, c.batch_size, self.drop)
        per_video = self.views[0] * self.views[1]
        share = partition.eval_share(n, self.rank, self.world_size)
        return sum(-(-len(p) * per_video // c.eval_batch_size)
                   for p in partition.split_even(share, self.workers))

    # ---- metadata --------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Samples (videos) the loader sees: the shard set's, or those of the ``label_map``'s
        labels."""
        return self.shardset.num_samples

    @property
    def num_classes(self) -> int | dict[str, int] | None:
        """Number of classes: ``max(label_map.values()) + 1``, else from ``shards.json`` (None
        when unknown); a multi-head set: head -> classes."""
        if self.shardset.heads:
            return self.shardset.head_sizes
        if self.label_map is not None:
            return max(self.label_map.values()) + 1
        return self.shardset.num_classes

    @property
    def classes(self) -> list[str] | dict[str, list[str]] | None:
        """Class names by (new) label from ``shards.json``; None when unknown or when ``label_map``
        is not one to one onto 0..k-1 (e.g. it merges classes into groups); a multi-head set: head
        -> names."""
        if self.shardset.heads:
            return dict(self.shardset.heads)
        names, lm = self.shardset.classes, self.label_map
        if names is None or lm is None:
            return names
        if sorted(lm.values()) != list(range(len(lm))):
            return None
        by_new = {v: k for k, v in lm.items()}
        return [names[by_new[i]] for i in range(len(lm))]

    def __len__(self) -> int:
        return self.length

    # ---- epoch and state -------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning at the next iteration."""
        self.epoch, self.step = epoch, 0
        self._segment = partition.FRESH

    @property
    def position(self) -> int:
        """Positions of the epoch's order the whole job has consumed (after every rank's ``step``
        batches)."""
        if not self.train:
            return 0
        return self._segment.consumed(self.step, self.world_size, self.cfg.batch_size)

    def _identity(self) -> dict:
        """What makes the epoch's order: the same values give the same samples at the same
        positions."""
        lm = sorted(self.label_map.items()) if self.label_map is not None else None
        return {"seed": self.cfg.seed, "num_samples": self.num_samples,
                "shuffle_block": self.cfg.shuffle_block, "fingerprint": self.shardset.fingerprint,
                "label_map": lm}

    def state_dict(self) -> dict:
        """Position after the last batch handed out: resuming continues with the very next batch."""
        return {"epoch": self.epoch, "step": self.step, "position": self.position,
                "rank": self.rank, "world_size": self.world_size, "batch_size": self.cfg.batch_size,
                "drop": self.drop, "bad_samples": self.bad_samples, **self._identity()}

    def load_state_dict(self, state: dict) -> bool:
        """Resume from a ``state_dict()`` of any rank of a saved job, on any layout (world size,
        workers, batch size): the epoch goes on at the saved position of its order. Returns True
        when the layout is the saved one (then the batches are exactly those of the uninterrupted
        run), False otherwise."""
        if not self.train:
            raise ValueError("evaluation loaders cannot resume mid-pass; rerun the evaluation from "
                             "the start")
        if "position" not in state:
            raise ValueError("this loader state was saved by tstl before 0.3 (its partition "
                             "depended on the world size); resume it with that version, or start "
                             "the run again in a new out_dir")
        mine = self._identity()
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine:
            diff = {k: (theirs[k], mine[k]) for k in mine
                    if theirs[k] != mine[k] and k != "label_map"}
            raise ValueError(f"loader state was saved for another epoch order (saved vs now: "
                             f"{diff or 'label_map'}): resume with the same data.seed, "
                             "data.shuffle_block and shard set, or restart the epoch with "
                             "set_epoch()")
        self.epoch = int(state["epoch"])
        n, world, bsz = self.num_samples, self.world_size, self.cfg.batch_size
        self._segment = partition.resume_segment(n, int(state["position"]), world, bsz, self.drop)
        self.step = self._segment.first_step
        exact = ((state["world_size"], state["batch_size"], state.get("drop", False))
                 == (world, bsz, self.drop))
        if exact and self.step != state["step"]:
            raise ValueError(f"loader state says step {state['step']} at position "
                             f"{state['position']}, which this layout puts at step {self.step}: "
                             "the state is damaged")
        if not exact:
            logger.info("resume of epoch %d at position %d of %d on another layout: %d ranks x "
                        "batch %d saved, %d x %d now; continuing at step %d of %d", self.epoch,
                        state["position"], n, state["world_size"], state["batch_size"], world, bsz,
                        self.step, len(self))
        return exact

    def load_state_dicts(self, states: Sequence[dict]) -> bool:
        """Resume from the ``state_dict()`` of every rank of a saved job (they agree on the
        position; the job's bad-sample count goes on, kept by rank 0). Returns ``load_state_dict``'s
        answer."""
        if not states:
            raise ValueError("no loader state to resume from")
        ref = states[0]
        if any((st.get("epoch"), st.get("position")) != (ref.get("epoch"), ref.get("position"))
               for st in states):
            raise ValueError("the saved ranks' loader states are at different epochs or positions")
        exact = self.load_state_dict(ref)
        self.bad_samples = (sum(int(st.get("bad_samples", 0)) for st in states) if self.rank == 0
                            else 0)
        return exact

    # ---- the bad-sample limit --------------------------------------------------------------------
    def _group(self) -> bool:
        """Whether this loader is one rank of the initialised process group (then every rank
        iterates it alike)."""
        d = torch.distributed
        return (self.world_size > 1 and d.is_available() and d.is_initialized()
                and d.get_world_size() == self.world_size and d.get_rank() == self.rank)

    def _check_bad(self, last: bool, starved: bool) -> None:
        """The one place the bad-sample limit is decided, at every batch boundary, identically on
        every rank.

        ``bad``/``seen`` are the raw samples found bad / read by this process' loader so far (all
        epochs, all workers), summed over the ranks (one all-reduce per batch; none for a single
        process). Fails when ``bad > max_bad_fraction * seen`` once ``seen >= min_bad_check`` or at
        the last batch of an epoch, or when a worker of any rank had no decodable sample at all. The
        rule and message depend only on the summed numbers, so all ranks raise the same error at the
        same step (docs/loader.md, "Bad samples").
        """
        c = self.cfg
        counts = [float(self._bad_run), float(self._seen_run)] + [0.0] * self.world_size
        counts[2 + self.rank] = 1.0 if starved else 0.0
        if self._group():
            d = torch.distributed
            dev = (torch.device("cuda", torch.cuda.current_device()) if d.get_backend() == "nccl"
                   else "cpu")
            t = torch.tensor(counts, dtype=torch.float64, device=dev)
            d.all_reduce(t, op=d.ReduceOp.SUM)
            counts = t.tolist()
        bad, seen = int(counts[0]), int(counts[1])
        starved_ranks = [r for r in range(self.world_size) if counts[2 + r] > 0]
        over = seen > 0 and bad > c.max_bad_fraction * seen and (seen >= c.min_bad_check or last)
        if not over and not starved_ranks:
            return
        where = (f"the bad samples are listed in {c.quarantine} (key, shard, reason)"
                 if c.quarantine
                 else "the bad samples are logged as warnings (set data.quarantine to list them "
                      "in a file)")
        why = (f"rank(s) {starved_ranks} met a batch without a single decodable sample, nor one "
               f"among the {LOOKAHEAD} samples after it; " if starved_ranks else "")
        raise BadSampleRateError(
            f"{why}{bad} of {seen} samples read on {self.world_size} rank(s) were bad, more than "
            f"data.max_bad_fraction={c.max_bad_fraction:g} allows; {where}. Rebuild those "
            "videos/shards (make shards) or raise data.max_bad_fraction")

    # ---- iteration -------------------------------------------------------------------------------
    def _mixup(self) -> Mixup:
        if not self.num_classes:
            raise ValueError("mixup/cutmix need num_classes; read the shards through shards.json")
        c = self.cfg
        kw = dict(mixup_alpha=c.mixup, cutmix_alpha=c.cutmix, prob=c.mixup_prob,
                  switch_prob=c.mixup_switch_prob, label_smoothing=c.label_smoothing)
        if self.shardset.heads:  # one lambda for every head (CAST util_tools/mixup.py:218-221)
            return MultiHeadMixup(self.shardset.head_sizes, **kw)
        return Mixup(num_classes=self.num_classes, **kw)

    def to(self, device: torch.device | str) -> ShardLoader:
        """Run the batch stages on ``device`` (the training device) and yield batches there; returns
        ``self``."""
        self.device = torch.device(device)
        return self

    @property
    def augment_on(self) -> str:
        """``worker`` or ``device``: ``data.augment_on`` with ``auto`` resolved against
        ``self.device``."""
        if self.cfg.augment_on != "auto":
            return self.cfg.augment_on
        return "device" if self.device.type == "cuda" else "worker"

    def _stages(self) -> list[BatchStage]:
        """The batch stages, in order (``tstl.data.device.BATCH_STAGES``: add one there)."""
        return build_stages(self.cfg, train=self.train, device=self.device, mixup=self.mixup,
                            augment_on=self.augment_on)

    def __iter__(self) -> Iterator[dict]:
        total = len(self)
        if self.step >= total:  # the previous epoch ran to its end: go on with the next one
            self.set_epoch(self.epoch + 1)
        self._check_unchanged()
        c = self.cfg
        spec = StreamSpec(c, self.shardset, self.train, self.rank, self.world_size, self.epoch,
                          self.workers, total, self.step, self._segment, self.views,
                          label_map=self.label_map, worker_augment=self.augment_on == "worker")
        stages = self._stages()
        nw = c.num_workers
        # workers reuse the batch buffers we are done with
        returns = Returns(self.workers) if nw else None
        if nw and not self._room_checked:
            bsz = c.batch_size if self.train else c.eval_batch_size
            check_room(nw, c.prefetch_factor + BUFFERS_EXTRA,
                       bsz * c.num_frames * c.input_size ** 2 * 3)
            self._room_checked = True
        spec.buffers = returns.link if returns else None
        pin = c.pin_memory or self.device.type == "cuda"  # pinned pages make the copy non-blocking
        dl = DataLoader(ClipStream(spec), batch_size=None, num_workers=nw, pin_memory=pin,
                        prefetch_factor=c.prefetch_factor if nw else None, persistent_workers=False,
                        worker_init_fn=orphan_guard if nw else None)
        try:
            yield from self._batches(dl, stages, total, returns)
        finally:
            if returns is not None:
                returns.close()
        if self.step != total:
            raise RuntimeError(f"rank {self.rank} produced {self.step} batches instead of {total}")

    def _check_unchanged(self) -> None:
        """Stop a run whose shard set was replaced under it (checked once per epoch: one small
        read)."""
        why = changed(self.shardset, ReadPolicy(self.cfg.read_timeout_s, self.cfg.read_retries))
        if why:
            raise ShardSetChanged(f"{why}: a run reads one version of its shard set from start "
                                  "to end. Do not rebuild or republish a set that a job is "
                                  "reading (build a new folder instead); rerun this job to "
                                  "continue from its last checkpoint on the new set")

    def _batches(self, dl: DataLoader, stages: list[BatchStage], total: int,
                 returns: Returns | None) -> Iterator[dict]:
        for batch in dl:
            if returns is not None:
                returns.poll()
            bad, read = batch.pop("_bad"), batch.pop("_read")
            self.bad_samples += bad
            self._bad_run += bad
            self._seen_run += read
            self._check_bad(last=self.step + 1 == total, starved=batch.pop("_starved", False))
            # each stage's draws are keyed by its name and the batch's place in the epoch's order
            # (the position of its first sample): the same on any number of ranks and workers
            first = self._segment.positions(self.step, self.rank, self.world_size,
                                            self.cfg.batch_size)[0] if self.train else self.step
            for stage in stages:
                batch = stage(batch, stage_seed(self.cfg.seed, self.epoch, (int(first),),
                                                stage.name))
            self.step += 1
            yield batch


def _check_label_map(label_map: Mapping[int, int] | None,
                     num_classes: int | None) -> dict[int, int] | None:
    if label_map is None:
        return None
    lm = {int(k): int(v) for k, v in label_map.items()}
    if not lm:
        raise ValueError("label_map is empty: it would drop every sample")
    if min(lm.values()) < 0 or set(lm.values()) != set(range(max(lm.values()) + 1)):
        raise ValueError(f"label_map must use every new label 0..{max(lm.values())} and no "
                         f"negative one, got {sorted(set(lm.values()))}")
    outside = sorted(k for k in lm if k < 0 or (num_classes is not None and k >= num_classes))
    if outside:
        raise ValueError(f"label_map keys {outside[:8]} are not classes of the shard set "
                         f"({num_classes} classes)")
    return lm


def _shards(source: Source, cfg: DataConfig, label_map: Mapping[int, int] | None) -> ShardList:
    if isinstance(source, ShardList):
        return source
    # selected through the index: nothing is read
    labels = sorted(label_map) if label_map is not None else ()
    return resolve(source, cfg.shard_url_template, labels, read_timeout_s=cfg.read_timeout_s,
                   read_retries=cfg.read_retries)


def build_train_loader(cfg: DataConfig, source: Source, *, rank: int = 0, world_size: int = 1,
                       epoch: int = 0, balance: str = "pad",
                       label_map: Mapping[int, int] | None = None) -> ShardLoader:
    """Training loader of one rank: shuffled, augmented, mixed; ``len()`` equal on every rank.

    Args:
        cfg: loader configuration.
        source: shard-set directory, ``shards.json`` path/URL, brace pattern, ``pipe:``/http URL or
            a list.
        rank, world_size: this process' place in the job.
        epoch: first epoch to produce (``set_epoch`` moves on).
        balance: ``pad`` repeats up to ``world_size * batch_size - 1`` samples per epoch so nothing
            is left out; ``drop`` leaves up to that many out instead (a different few each epoch).
        label_map: keep only samples whose label is a key and relabel them ``y -> label_map[y]``
            (e.g. class -> group, or a group's classes -> 0..k-1); ``num_classes`` becomes
            ``max(values) + 1``. None keeps all.
    """
    return ShardLoader(cfg, _shards(source, cfg, label_map), train=True, rank=rank,
                       world_size=world_size, epoch=epoch, balance=balance, label_map=label_map)


def build_eval_loader(cfg: DataConfig, source: Source, *, rank: int = 0, world_size: int = 1,
                      views: tuple[int, int] | None = None,
                      label_map: Mapping[int, int] | None = None) -> ShardLoader:
    """Evaluation loader: every video once (plus documented repeats), T x C views each, batches with
    ``view``; ``label_map`` as in ``build_train_loader``."""
    return ShardLoader(cfg, _shards(source, cfg, label_map), train=False, rank=rank,
                       world_size=world_size, views=tuple(views or cfg.test_views),
                       label_map=label_map)
