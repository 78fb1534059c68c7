"""``data.decoder``: decord (default) and the optional torchcodec backend.

torchcodec's PyPI wheels load only with a CUDA build of torch
(``../shared/reference/environment.md`` 5.4); where it cannot load (this project's CPU venv and CI),
the tests check that the loader and the preflight name the fix, and the tests that decode with it
are skipped with that reason. They were run in a venv with torch 2.13.0+cu130 and torchcodec 0.17.0
on this CPU machine (see docs/loader.md).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tstl.core.exitcodes import UsageError
from tstl.data import DataConfig, build_eval_loader, build_train_loader
from tstl.data.decode import BadSample, check_decoder, decode_clip, decoder_available

TORCHCODEC = decoder_available("torchcodec")
needs_torchcodec = pytest.mark.skipif(
    not TORCHCODEC, reason="torchcodec cannot load here (needs a CUDA torch build)")
CFG = dict(num_frames=4, input_size=32, batch_size=2, eval_batch_size=4, num_workers=1,
           mixup=0.0, cutmix=0.0, reprob=0.0, rand_augment="", min_bad_check=1000)


def test_unknown_decoder_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="data.decoder must be decord or torchcodec"):
        DataConfig(decoder="pyav")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="data.decoder must be one of"):
        check_decoder("pyav")


@pytest.mark.skipif(TORCHCODEC,
                    reason="torchcodec works here; the missing-package message is not reachable")
def test_unusable_torchcodec_is_named_before_any_worker_starts(
        shardset: Callable[..., Path]) -> None:
    from tstl.train.preflight import check_decoder as preflight

    root = shardset(4, [4])
    with pytest.raises(RuntimeError, match=r"CUDA build of torch.*or use data.decoder=decord"):
        build_train_loader(DataConfig(**CFG, decoder="torchcodec"), root)
    with pytest.raises(UsageError,
                       match="data.decoder: data.decoder=torchcodec needs the torchcodec package"):
        preflight("torchcodec")
    preflight("decord")


def _six(k: int) -> np.ndarray:
    return np.linspace(0, k - 1, 6).round().astype(int)


@needs_torchcodec
def test_torchcodec_decodes_the_frames_decord_decodes(videos: dict[int, bytes]) -> None:
    for n, data in videos.items():
        a = decode_clip(data, n, _six).astype(int)
        b = decode_clip(data, n, _six, decoder="torchcodec").astype(int)
        # same frames; only the YUV -> RGB rounding of the two FFmpeg builds may differ
        assert a.shape == b.shape and np.abs(a - b).mean() < 1.0 and np.abs(a - b).max() <= 8, n
    with pytest.raises(BadSample):
        decode_clip(b"\0" * 4096, 10, lambda k: [0], decoder="torchcodec")
    seen: list[int] = []
    decode_clip(videos[12], 500, lambda k: seen.append(k) or [k - 1], decoder="torchcodec")
    assert seen == [12]  # a json count beyond the stream is capped by the decoder


@needs_torchcodec
def test_loader_with_torchcodec_matches_decord(shardset: Callable[..., Path]) -> None:
    root = shardset(8, [4, 4])
    for build in (build_train_loader, build_eval_loader):
        a = list(build(DataConfig(**CFG), root))
        b = list(build(DataConfig(**CFG, decoder="torchcodec"), root))
        assert [x["key"] for x in a] == [x["key"] for x in b]
        for x, y in zip(a, b):
            assert (x["video"].shape == y["video"].shape
                    and (x["video"] - y["video"]).abs().mean() < 0.05)
