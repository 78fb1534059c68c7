"""``ShardLoader``: equal steps on every rank, exact epoch coverage, batch stages on the device, mid-epoch resume."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence

import torch
from timm.data import Mixup
from torch.utils.data import DataLoader

from tstl.data import elastic
from tstl.data.buffers import BUFFERS_EXTRA, Returns, check_room
from tstl.data.config import DataConfig
from tstl.data.decode import check_decoder
from tstl.data.device import BatchStage, MultiHeadMixup, build_stages, stage_seed
from tstl.data.pipeline import BadSampleRateError, ClipStream, RoleState, StreamSpec
from tstl.data.sources import ShardList, has_index, resolve, slot_length

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
        balance: ``pad`` (default) or ``drop``, the rule that makes all slots equal (see ``slot_length``).
        label_map: relabelling ``y -> label_map[y]``; samples whose label is not a key are not in ``shardset``
            (``resolve(..., labels=label_map.keys())``). None keeps the labels.
    """

    def __init__(self, cfg: DataConfig, shardset: ShardList, *, train: bool, rank: int = 0, world_size: int = 1,
                 epoch: int = 0, views: tuple[int, int] = (1, 1), balance: str = "pad",
                 label_map: Mapping[int, int] | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        check_decoder(cfg.decoder)  # here, not as a bad sample in every worker
        if label_map is not None and shardset.heads:
            raise ValueError(f"label_map relabels one-label shard sets; this one has the heads "
                             f"{', '.join(shardset.heads)}")
        self.cfg, self.shardset, self.train = cfg, shardset, train
        self.rank, self.world_size, self.views = rank, world_size, tuple(views)
        self.workers = max(1, cfg.num_workers)
        self.label_map = _check_label_map(label_map, shardset.num_classes)
        bsz = cfg.batch_size if train else 1
        self.drop = balance == "drop"
        self.length = slot_length(shardset.num_samples, world_size * self.workers, bsz, self.drop)
        per_role = self.length if train else self.length * self.views[0] * self.views[1]
        self.batches_per_role = -(-per_role // (cfg.batch_size if train else cfg.eval_batch_size))
        self.mixup = self._mixup() if train and cfg.mixup_active else None
        self.device = torch.device("cpu")
        self.bad_samples = 0
        self._bad_run = self._seen_run = 0  # this process' counts for the bad-sample limit (_check_bad)
        self._room_checked = False  # /dev/shm size warned about at most once
        self.set_epoch(epoch)

    # ---- metadata -----------------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Samples (videos) in the shard set."""
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
        """Class names by (new) label from ``shards.json``; None when unknown or when ``label_map`` is not one to
        one onto 0..k-1 (e.g. it merges classes into groups); a multi-head set: head -> names."""
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
        return self.batches_per_role * self.workers

    # ---- epoch and state ----------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning at the next iteration."""
        self.epoch, self.step = epoch, 0
        self._roles: dict[int, RoleState] = {}
        # The sample-index ranges the slots of this epoch share and the slot length: the whole epoch, or after an
        # elastic resume (load_state_dicts) only what the saved job had not consumed yet.
        self._plan: list[tuple[int, int]] | None = None
        self._plan_length = self.length

    # the keys that must match for an exact (same batches) resume; "shuffle_buffer" in states since elastic resume
    _LAYOUT = ("world_size", "workers", "seed", "length", "num_samples", "shuffle_buffer")

    def state_dict(self) -> dict:
        """Position after the last batch handed out: resuming continues with the very next batch."""
        return {"epoch": self.epoch, "step": self.step, "rank": self.rank, "world_size": self.world_size,
                "workers": self.workers, "seed": self.cfg.seed, "length": self.length,
                "num_samples": self.num_samples, "shuffle_buffer": self.cfg.shuffle_buffer if self.train else 0,
                "plan": [list(r) for r in self._plan] if self._plan is not None else None,
                "plan_length": self._plan_length,
                "bad_samples": self.bad_samples, "roles": {r: s.to_dict() for r, s in self._roles.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Resume from this rank's ``state_dict()``; the job layout (world size, workers, seed, data, batch size,
        shuffle buffer) must be unchanged. For another layout pass every rank's state to ``load_state_dicts``."""
        if not self.train and state.get("step", 0):
            raise ValueError("evaluation loaders cannot resume mid-pass; rerun the evaluation from the start")
        theirs = self._layout(state)
        mine = {k: v for k, v in self._layout(self.state_dict()).items() if k in theirs}
        if mine != theirs or state["rank"] != self.rank:
            raise ValueError(f"loader state was saved with {theirs} (rank {state['rank']}), this loader has {mine} "
                             f"(rank {self.rank}); pass the states of all saved ranks to load_state_dicts() to "
                             "resume on another layout, or restart the epoch with set_epoch()")
        self.set_epoch(state["epoch"])
        self.step, self.bad_samples = state["step"], state["bad_samples"]
        self._roles = {int(r): RoleState(**s) for r, s in state["roles"].items()}
        if state.get("plan") is not None:
            self._plan = [(int(a), int(b)) for a, b in state["plan"]]
            self._plan_length = int(state["plan_length"])

    def _layout(self, state: dict) -> dict:
        return {k: state[k] for k in self._LAYOUT if k in state}

    def load_state_dicts(self, states: Sequence[dict]) -> bool:
        """Resume from the ``state_dict()`` of every rank of a saved job, on any layout (elastic resume).

        With the saved layout (world size, ``num_workers``, batch size, shuffle buffer) this is
        ``load_state_dict(states[rank])``: the very next batch of the uninterrupted epoch. Otherwise the samples
        of the saved epoch that no saved rank had taken out of its shuffle buffer are spread over this job's
        ranks and workers (``tstl.data.elastic``; padded by repeating the remainder's first samples so every rank
        has the same number of batches), and ``step`` is set so that ``len(self) - step`` batches remain. The
        shard set and the seed must be the same. See ``docs/loader.md`` ("Elastic resume") for the guarantee.
        Returns True for the exact resume, False for a redistribution.
        """
        if not self.train:
            raise ValueError("evaluation loaders cannot resume mid-pass; rerun the evaluation from the start")
        states = sorted(states, key=lambda st: st["rank"])
        ref = states[0]
        if [st["rank"] for st in states] != list(range(ref["world_size"])):
            raise ValueError(f"need the loader states of all {ref['world_size']} saved ranks, got ranks "
                             f"{[st['rank'] for st in states]}")
        if any((st["epoch"], st.get("plan"), st.get("plan_length")) != (ref["epoch"], ref.get("plan"),
                                                                         ref.get("plan_length")) for st in states):
            raise ValueError("the saved ranks' loader states are from different epochs or plans")
        mine = self._layout(self.state_dict())
        if self._layout(ref) == {k: v for k, v in mine.items() if k in ref}:
            self.load_state_dict(states[self.rank])
            return True
        same = {k: ref.get(k, mine[k]) for k in ("seed", "num_samples")}
        if same != {k: mine[k] for k in same}:
            raise ValueError(f"loader state was saved with seed/samples {same}, this loader has "
                             f"{ {k: mine[k] for k in same} }: the epoch's sample order differs; resume with the same "
                             "data.seed and shard set, or restart the epoch with set_epoch()")
        rest = elastic.remainder(states, self.num_samples)
        self.set_epoch(ref["epoch"])
        # the job's bad-sample count goes on, kept by rank 0
        self.bad_samples = sum(st["bad_samples"] for st in states) if self.rank == 0 else 0
        left = sum(b - a for a, b in rest)
        try:
            plan_length = slot_length(left, self.world_size * self.workers, self.cfg.batch_size, self.drop) if left \
                else 0
        except ValueError:  # balance=drop and fewer samples left than one batch per slot: they are left out
            plan_length = 0
        if plan_length == 0:
            self.step = len(self)  # the epoch is complete (its unconsumed positions were only padding)
        else:
            self._plan, self._plan_length = rest, plan_length
            self.step = len(self) - plan_length // self.cfg.batch_size * self.workers
        logger.info("elastic resume of epoch %d: %d ranks x %d workers saved, %d x %d now; %d of %d samples left "
                    "(%d per slot), continuing at step %d of %d", self.epoch, ref["world_size"], ref["workers"],
                    self.world_size, self.workers, left, len(elastic.covered(ref, self.num_samples)), plan_length,
                    self.step, len(self))
        return False

    # ---- the bad-sample limit -----------------------------------------------------------------------------
    def _group(self) -> bool:
        """Whether this loader is one rank of the initialised process group (then every rank iterates it alike)."""
        d = torch.distributed
        return (self.world_size > 1 and d.is_available() and d.is_initialized()
                and d.get_world_size() == self.world_size and d.get_rank() == self.rank)

    def _check_bad(self, last: bool, starved: bool) -> None:
        """The one place the bad-sample limit is decided, at every batch boundary, identically on every rank.

        ``bad``/``seen`` are the raw samples found bad / read by this process' loader so far (all epochs, all
        workers), summed over the ranks (one all-reduce per batch; none for a single process). Fails when
        ``bad > max_bad_fraction * seen`` once ``seen >= min_bad_check`` or at the last batch of an epoch, or when
        a worker of any rank had no decodable sample at all. The rule and message depend only on the summed
        numbers, so all ranks raise the same error at the same step (docs/loader.md, "Bad samples").
        """
        c = self.cfg
        counts = [float(self._bad_run), float(self._seen_run)] + [0.0] * self.world_size
        counts[2 + self.rank] = 1.0 if starved else 0.0
        if self._group():
            d = torch.distributed
            dev = torch.device("cuda", torch.cuda.current_device()) if d.get_backend() == "nccl" else "cpu"
            t = torch.tensor(counts, dtype=torch.float64, device=dev)
            d.all_reduce(t, op=d.ReduceOp.SUM)
            counts = t.tolist()
        bad, seen = int(counts[0]), int(counts[1])
        starved_ranks = [r for r in range(self.world_size) if counts[2 + r] > 0]
        over = seen > 0 and bad > c.max_bad_fraction * seen and (seen >= c.min_bad_check or last)
        if not over and not starved_ranks:
            return
        where = (f"the bad samples are listed in {c.quarantine} (key, shard, reason)" if c.quarantine
                 else "the bad samples are logged as warnings (set data.quarantine to list them in a file)")
        why = (f"rank(s) {starved_ranks} have a worker slot without a single decodable sample; " if starved_ranks
               else "")
        raise BadSampleRateError(
            f"{why}{bad} of {seen} samples read on {self.world_size} rank(s) were bad, more than "
            f"data.max_bad_fraction={c.max_bad_fraction:g} allows; {where}. Rebuild those videos/shards "
            "(make shards) or raise data.max_bad_fraction")

    # ---- iteration ----------------------------------------------------------------------------------------
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
        """Run the batch stages on ``device`` (the training device) and yield batches there; returns ``self``."""
        self.device = torch.device(device)
        return self

    @property
    def augment_on(self) -> str:
        """``worker`` or ``device``: ``data.augment_on`` with ``auto`` resolved against ``self.device``."""
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
        spec = StreamSpec(self.cfg, self.shardset, self.train, self.rank, self.world_size, self.epoch, self.workers,
                          self._plan_length, self.views, dict(self._roles), self.step % self.workers,
                          label_map=self.label_map, worker_augment=self.augment_on == "worker", plan=self._plan)
        stages = self._stages()
        nw = self.cfg.num_workers
        returns = Returns(self.workers) if nw else None  # workers reuse the batch buffers we are done with
        if nw and not self._room_checked:
            c = self.cfg
            bsz = c.batch_size if self.train else c.eval_batch_size
            check_room(nw, c.prefetch_factor + BUFFERS_EXTRA, bsz * c.num_frames * c.input_size ** 2 * 3)
            self._room_checked = True
        spec.buffers = returns.link if returns else None
        pin = self.cfg.pin_memory or self.device.type == "cuda"  # pinned pages make the copy non-blocking
        dl = DataLoader(ClipStream(spec), batch_size=None, num_workers=nw, pin_memory=pin,
                        prefetch_factor=self.cfg.prefetch_factor if nw else None, persistent_workers=False)
        try:
            yield from self._batches(dl, stages, total, returns)
        finally:
            if returns is not None:
                returns.close()
        if self.step != total:
            raise RuntimeError(f"rank {self.rank} produced {self.step} batches instead of {total}; the shard set "
                               "changed during the epoch?")

    def _batches(self, dl: DataLoader, stages: list[BatchStage], total: int,
                 returns: Returns | None) -> Iterator[dict]:
        for batch in dl:
            if returns is not None:
                returns.poll()
            role = batch.pop("_role")
            state = RoleState(**batch.pop("_state"))
            prev = self._roles.get(role, RoleState())
            self.bad_samples += state.bad - prev.bad
            self._roles[role] = state
            self._bad_run += state.bad - prev.bad
            self._seen_run += state.pos - prev.pos
            self._check_bad(last=self.step + 1 == total, starved=batch.pop("_starved", False))
            key = (self.rank, self.step)
            for stage in stages:  # each stage's draws are keyed by its name (device.stage_seed)
                batch = stage(batch, stage_seed(self.cfg.seed, self.epoch, key, stage.name))
            self.step += 1
            yield batch


def _check_label_map(label_map: Mapping[int, int] | None, num_classes: int | None) -> dict[int, int] | None:
    if label_map is None:
        return None
    lm = {int(k): int(v) for k, v in label_map.items()}
    if not lm:
        raise ValueError("label_map is empty: it would drop every sample")
    if min(lm.values()) < 0 or set(lm.values()) != set(range(max(lm.values()) + 1)):
        raise ValueError(f"label_map must use every new label 0..{max(lm.values())} and no negative one, "
                         f"got {sorted(set(lm.values()))}")
    outside = sorted(k for k in lm if k < 0 or (num_classes is not None and k >= num_classes))
    if outside:
        raise ValueError(f"label_map keys {outside[:8]} are not classes of the shard set ({num_classes} classes)")
    return lm


def _shards(source: Source, cfg: DataConfig, label_map: Mapping[int, int] | None) -> ShardList:
    if isinstance(source, ShardList):
        return source
    read = {"read_timeout_s": cfg.read_timeout_s, "read_retries": cfg.read_retries}
    if label_map is None:
        return resolve(source, cfg.shard_url_template, **read)
    if has_index(source, cfg.shard_url_template):  # only the shard list is read: cheap
        full = resolve(source, cfg.shard_url_template, **read)
        if full.num_classes is not None and set(label_map) >= set(range(full.num_classes)):
            return full  # relabelling every class (class -> group) filters nothing: no per-label counting
    return resolve(source, cfg.shard_url_template, sorted(label_map), **read)


def build_train_loader(cfg: DataConfig, source: Source, *, rank: int = 0, world_size: int = 1, epoch: int = 0,
                       balance: str = "pad", label_map: Mapping[int, int] | None = None) -> ShardLoader:
    """Training loader of one rank: shuffled, augmented, mixed; ``len()`` equal on every rank.

    Args:
        cfg: loader configuration.
        source: shard-set directory, ``shards.json`` path/URL, brace pattern, ``pipe:``/http URL or a list.
        rank, world_size: this process' place in the job.
        epoch: first epoch to produce (``set_epoch`` moves on).
        balance: ``pad`` repeats up to ``world_size * workers * batch_size - 1`` samples per epoch so nothing is
            left out; ``drop`` leaves up to that many out instead (a different few each epoch).
        label_map: keep only samples whose label is a key and relabel them ``y -> label_map[y]`` (e.g. class ->
            group, or a group's classes -> 0..k-1); ``num_classes`` becomes ``max(values) + 1``. None keeps all.
    """
    return ShardLoader(cfg, _shards(source, cfg, label_map), train=True, rank=rank, world_size=world_size,
                       epoch=epoch, balance=balance, label_map=label_map)


def build_eval_loader(cfg: DataConfig, source: Source, *, rank: int = 0, world_size: int = 1,
                      views: tuple[int, int] | None = None,
                      label_map: Mapping[int, int] | None = None) -> ShardLoader:
    """Evaluation loader: every video once (plus documented repeats), T x C views each, batches with ``view``;
    ``label_map`` as in ``build_train_loader``."""
    return ShardLoader(cfg, _shards(source, cfg, label_map), train=False, rank=rank, world_size=world_size,
                       views=tuple(views or cfg.test_views), label_map=label_map)
