"""The multi-view test transform: video bytes (+ trusted frame count) -> the uint8 views that
``tstl eval`` scores.

One function, :func:`decode_views`, owns it: the evaluation loader (``EvalClipViews``, per shard
sample) and ``tstl predict`` (per file, shard sample or time window) both call it, so a video gets
the same frames, the same resize and the same crops whichever way it arrives. Normalisation stays
a batch stage (``tstl.data.device``).
"""

from __future__ import annotations

import numpy as np
import torch

from tstl.data import sampling
from tstl.data.config import DataConfig
from tstl.data.decode import BadSample, decode_clip
from tstl.data.transforms import EvalViews


def decode_views(data: bytes, frames: int, cfg: DataConfig, views: tuple[int, int],
                 span: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """The ``T x C`` test views of one video: uint8 ``[num_frames, S, S, 3]`` clips, view
    ``t * C + c``.

    Args:
        data: the video bytes (what ``decode_clip`` reads: the prepared mp4 of a shard sample).
        frames: the exact decodable frame count (a shard's ``json.frames``, or
            ``shard_tools.build.probe_bytes`` for a file); ``decode_clip`` caps it by what the
            decoder reports.
        cfg: frame sampling (``sampling``, ``sampling_rate``, ``sampling_convention``,
            ``num_frames``), resize and crop sizes, decoder and decode time limit.
        views: ``(T, C)``: temporal clips x spatial crops.
        span: only frames ``[start, stop)`` (a time window of a long video, ``tstl predict
            --window``): the views are taken of that part as if it were the whole video. None:
            the whole video.

    Raises:
        BadSample: the bytes do not decode, the video (or ``span``) has no frames, or decoding
            timed out.
    """
    nt, nc = views
    t_len = cfg.num_frames
    start, stop = span if span is not None else (0, None)

    def pick(n: int) -> np.ndarray:
        end = n if stop is None else min(stop, n)
        if end - start < 1:
            raise BadSample(f"frames [{start}, {stop}) are outside the video's {n} frames")
        return start + np.concatenate([
            sampling.test_indices(cfg.sampling, end - start, t_len, cfg.sampling_rate, t, nt,
                                  cfg.sampling_convention) for t in range(nt)])

    clip = decode_clip(data, frames, pick, cfg.decode_timeout_s, cfg.decoder)
    transform = EvalViews(cfg, nc)
    out = []
    for t in range(nt):
        resized = transform.resize(clip[t * t_len:(t + 1) * t_len])
        out += [transform.crop(resized, c) for c in range(nc)]
    return out
