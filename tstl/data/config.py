"""Typed configuration of the streaming loader."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from tstl.core.config import check_choices

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    """Frame sampling, augmentation and batching of one dataset (loaded with
    ``tstl.core.config.load_config``)."""

    num_frames: int = 16
    """Frames per clip (T)."""
    sampling: Literal["segment", "dense"] = "segment"
    """``segment``: one frame per equal segment (SSV2, TSN style); ``dense``: consecutive frames
    with a stride."""
    sampling_rate: int = 4
    """Stride between sampled frames for ``dense`` sampling."""
    input_size: int = 224
    """Output height and width of a clip."""
    short_side_scale: int = 0
    """Evaluation: the short side is resized to this before the spatial crops; 0 means
    ``input_size``."""
    flip: bool = False
    """Random horizontal flip in training. Keep it off for SSV2 (its labels name directions)."""
    rand_augment: str = "rand-m7-n4-mstd0.5-inc1"
    """timm RandAugment spec, drawn once per clip and applied to every frame; empty string disables
    it."""
    reprob: float = 0.25
    """Random erasing probability per clip (timm ``RandomErasing``, pixel mode, same box on every
    frame)."""
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    """Random resized crop: area fraction range."""
    rrc_ratio: tuple[float, float] = (0.75, 4 / 3)
    """Random resized crop: aspect ratio range."""
    mixup: float = 0.8
    """Mixup alpha (0 disables mixup)."""
    cutmix: float = 1.0
    """CutMix alpha (0 disables cutmix)."""
    mixup_prob: float = 1.0
    """Probability of applying mixup or cutmix to a batch."""
    mixup_switch_prob: float = 0.5
    """Probability of cutmix instead of mixup when both are on."""
    label_smoothing: float = 0.1
    """Label smoothing folded into the soft targets when mixup/cutmix is on."""
    batch_size: int = 8
    """Training clips per batch on each rank."""
    eval_batch_size: int = 8
    """Evaluation views per batch on each rank."""
    num_workers: int = 4
    """DataLoader worker processes per rank (0 = decode in the main process)."""
    shuffle_block: int = 0
    """Training order: the shards are put in a seeded order per epoch and cut into blocks of this
    many shards, whose samples are shuffled together; 0 (default) = one block, the whole set. Reads
    cost the same either way (every sample is read by range); a small block keeps a stretch of the
    epoch on few shards."""
    seed: int = 0
    """Base seed; the epoch's order and every augmentation derive from (seed, epoch, position in the
    order)."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel normalisation mean (values in 0..1)."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel normalisation standard deviation."""
    test_views: tuple[int, int] = (2, 3)
    """Evaluation views: temporal clips T x spatial crops C per video."""
    max_bad_fraction: float = 0.01
    """Fail (every rank together) when more than this fraction of the samples read so far, summed
    over all ranks and workers, are bad; checked at every batch once ``min_bad_check`` samples were
    read, and at the end of every epoch (docs/loader.md, "Bad samples")."""
    min_bad_check: int = 50
    """Samples all ranks together read before the bad-sample rate is enforced mid-epoch (a few bad
    ones early are not a trend); the end of an epoch checks regardless."""
    quarantine: str = ""
    """File that bad sample keys are appended to (``key<TAB>shard<TAB>reason``); empty = log
    only."""
    decoder: Literal["decord", "torchcodec"] = "decord"
    """Video decoder in the workers: ``decord`` (default) or ``torchcodec`` (optional; needs a CUDA
    build of torch and FFmpeg shared libraries, checked when the loader is built;
    ``tstl/data/decode.py``)."""
    decode_timeout_s: float = 30.0
    """A decode taking longer is abandoned and the sample counted bad (0 disables the guard)."""
    pin_memory: bool = False
    """Pin batches in page-locked memory (GPU training)."""
    prefetch_factor: int = 2
    """Batches prefetched per worker."""
    shard_url_template: str = ""
    """Read shards from ``template.format(name=...)`` (e.g.
    ``pipe:aws s3 cp s3://b/ssv2/train/{name} -``)."""
    sampling_convention: Literal["default", "cast", "tstl", "pyslowfast"] = "default"
    """Whose exact frame-index rule ``sampling`` follows (``tstl.data.sampling``): ``cast``
    (CAST/VideoMAE: SSV2 test views at segment starts and midpoints, dense clips by linspace over
    ``T * rate`` frames), ``tstl`` (TSTL's UCF101 loader: one frame per segment, with
    ``sampling_rate`` as its ``frame_sample_rate``), ``pyslowfast`` (TimeSformer), ``default`` (this
    project's own)."""
    train_crop: Literal["random_resized", "short_side_jitter"] = "random_resized"
    """Training crop: ``random_resized`` (CAST/VideoMAE: ``rrc_scale``/``rrc_ratio`` box resized to
    ``input_size``) or ``short_side_jitter`` (PySlowFast/TimeSformer: short side to a random size in
    ``jitter_scales``, then an ``input_size`` random crop; ``tstl.data.spatial``)."""
    jitter_scales: tuple[int, int] = (256, 320)
    """``short_side_jitter``: range of the short side (PySlowFast ``DATA.TRAIN_JITTER_SCALES``)."""
    jitter_inverse_uniform: bool = False
    """``short_side_jitter``: draw the short side as ``1 / U(1/max, 1/min)`` (PySlowFast
    ``DATA.INV_UNIFORM_SAMPLE``, on in TimeSformer's SSV2 recipe)."""
    augment_on: Literal["auto", "worker", "device"] = "auto"
    """Where RandAugment runs. ``worker``: in the DataLoader workers (one fused warp per frame +
    colour tables); ``device``: workers only crop, RandAugment runs batched on the loader's device
    (``ShardLoader.to(device)``); ``auto``: ``device`` when that device is CUDA, else ``worker``.
    Normalisation, erasing and mixup always run on the batch in the training process (workers hand
    uint8 clips)."""
    read_timeout_s: float = 60.0
    """Remote reads (``pipe:`` commands, http(s) URLs): a read that gets no data for this many
    seconds fails (the ``pipe:`` process is killed) and is retried; 0 = wait forever."""
    read_retries: int = 2
    """Remote reads: a failed or stalled shard is opened again this many times (going on after the
    samples already read), then its remaining samples are bad (quarantined with the reason)."""
    cache_dir: str = ""
    """Node-local cache of remote shard samples (http(s), ``pipe:``), shared by the node's ranks and
    workers: what one epoch fetched is read from here in the next. Empty = no cache. A full disk
    turns caching off with a warning (``tstl/data/cache.py``)."""
    cache_limit_gb: float = 0.0
    """Size limit of ``cache_dir`` in GB (least recently used samples are evicted first); 0 = only
    the disk."""

    RETIRED: ClassVar[dict[str, str]] = {
        "shuffle_buffer": "0.3: the epoch order is shuffled as a whole (data.shuffle_block), "
                          "no buffer needed"}

    def __post_init__(self) -> None:
        if self.num_frames < 1 or self.sampling_rate < 1 or self.input_size < 8:
            raise ValueError("num_frames and sampling_rate must be >= 1 and input_size >= 8")
        if self.batch_size < 1 or self.eval_batch_size < 1 or self.num_workers < 0:
            raise ValueError("batch sizes must be >= 1 and num_workers >= 0")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ValueError(f"mixup/cutmix need an even batch_size, got {self.batch_size}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError("max_bad_fraction must be in [0, 1]")
        if min(self.test_views) < 1:
            raise ValueError("test_views must be >= 1 in both entries")
        if (self.sampling == "segment" and self.sampling_convention == "cast"
                and self.test_views[0] > 2):
            raise ValueError(f"CAST's segment test rule has 1 or 2 temporal views, test_views is "
                             f"{self.test_views}; use sampling_convention=default for more")
        lo, hi = self.jitter_scales
        if self.train_crop == "short_side_jitter" and not self.input_size <= lo <= hi:
            raise ValueError(f"jitter_scales {self.jitter_scales} must satisfy "
                             f"input_size ({self.input_size}) <= min <= max for short_side_jitter")
        if self.shuffle_block < 0 or self.cache_limit_gb < 0:
            raise ValueError("data.shuffle_block and data.cache_limit_gb must be >= 0")
        if self.read_timeout_s < 0 or self.read_retries < 0:
            raise ValueError("data.read_timeout_s and data.read_retries must be >= 0")
        check_choices(self, "data")  # decoder, augment_on, ... of a DataConfig built in Python

    @property
    def mixup_active(self) -> bool:
        """Whether training batches carry soft (mixed) targets."""
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0
