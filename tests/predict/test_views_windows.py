"""The shared view function and time windows, on videos whose frames say which frame (or which
half) they are."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.predict.conftest import colour_video
from tstl.core.config import load_config
from tstl.core.ffmpeg import ffmpeg_exe
from tstl.data import sampling
from tstl.data.config import DataConfig
from tstl.data.decode import BadSample
from tstl.data.views import decode_views
from tstl.predict import Predictor
from tstl.predict.inputs import PrepareRule, probe
from tstl.predict.predictor import frame_span, windows
from tstl.predict.runs import Classifier, LoadedRun
from tstl.train.config import TrainConfig

CFG = DataConfig(num_frames=4, input_size=32, test_views=(2, 1), num_workers=0)


@pytest.fixture(scope="module")
def index_video(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """30 frames, each one flat grey whose level grows with the frame number (lossless H.264)."""
    path = tmp_path_factory.mktemp("idx") / "idx.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i",
                    "color=c=black:size=64x48:rate=10:duration=3", "-vf",
                    "geq=lum='20+N*7':cb=128:cr=128", "-c:v", "libx264", "-qp", "0", "-pix_fmt",
                    "yuv444p", "-threads", "1", "-y", str(path)], check=True)
    return path.read_bytes()


def _frame_numbers(clip: torch.Tensor, levels: np.ndarray) -> list[int]:
    """Which source frame each frame of a view is (by its grey level; resize and crop keep a flat
    frame flat)."""
    means = clip.float().mean(dim=(1, 2, 3)).numpy()
    return [int(np.abs(levels - m).argmin()) for m in means]


@pytest.mark.parametrize("span", [None, (10, 20), (25, 40)])
def test_views_follow_the_sampling_rule_of_the_video_or_a_span(index_video: bytes, span) -> None:
    import decord

    reader = decord.VideoReader(__import__("io").BytesIO(index_video))
    levels = reader.get_batch(list(range(len(reader)))).asnumpy().reshape(len(reader), -1).mean(1)
    assert len(np.unique(levels.round())) == 30  # every frame tells its number
    clips = decode_views(index_video, 30, CFG, (2, 1), span)
    assert len(clips) == 2
    assert all(c.shape == (4, 32, 32, 3) and c.dtype == torch.uint8 for c in clips)
    start, stop = span or (0, 30)
    stop = min(stop, 30)  # a span running past the end stops at the last frame
    for t, clip in enumerate(clips):
        want = start + sampling.test_indices("segment", stop - start, 4, 4, t, 2, "default")
        assert _frame_numbers(clip, levels) == want.tolist()


def test_a_span_outside_the_video_is_a_bad_sample(index_video: bytes) -> None:
    with pytest.raises(BadSample, match="outside the video's 30 frames"):
        decode_views(index_video, 30, CFG, (1, 1), (30, 40))


def test_windows_cover_the_video() -> None:
    assert windows(8.0, 2.0, 2.0) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert windows(8.0, 4.0, 3.0) == [(0, 4), (3, 7), (6, 8)]  # the 2 s rest is half a window: kept
    assert windows(7.5, 4.0, 3.0) == [(0, 4), (3, 7)]  # a 1.5 s rest is under half a window
    assert windows(1.5, 4.0, 2.0) == [(0, 1.5)]  # shorter than a window: the whole video
    assert frame_span(2.0, 4.0, 10.0, 80) == (20, 40)
    assert frame_span(7.95, 8.0, 10.0, 80) == (79, 80)
    with pytest.raises(ValueError):
        windows(8.0, 0.0, 1.0)


class ColourModel(nn.Module):
    """Logits (red, blue) from the mean red and blue of the (normalised) views: a model whose
    answers are known."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, b = x[:, 0].mean(dim=(1, 2, 3)), x[:, 2].mean(dim=(1, 2, 3))
        return torch.stack([r - b, b - r], dim=1) * 5


def colour_predictor(as_is: bool = False, views: str = "[2,2]") -> Predictor:
    cfg = load_config(TrainConfig, [], ["data.num_frames=4", "data.input_size=32",
                                        f"data.test_views={views}",
                                        "data.eval_batch_size=5", "engine.precision=fp32"])
    run = LoadedRun(Classifier(ColourModel(), cfg.test_merge), cfg, ["red", "blue"],
                    torch.device("cpu"), torch.float32, PrepareRule(as_is=as_is), "colour model")
    return Predictor(run, workers=2)


def test_each_window_names_the_colour_it_holds(tmp_path: Path) -> None:
    """The --window check of the issue on a video of two 'classes' (4 s red, then 4 s blue),
    through the prepare stage's transcode: every window wholly inside one part names that part."""
    video = colour_video(tmp_path / "red-blue.webm", ["red", "blue"], 4.0)
    (pred,) = colour_predictor().predict([video], window=2.0, stride=1.0)
    assert pred.ok, pred.error
    assert pred.frames == 80 and pred.duration == pytest.approx(8.0)
    assert [(w.start, w.end) for w in pred.windows] == [(float(s), float(s + 2)) for s in range(7)]
    classes = ["red", "blue"]
    for w in pred.windows:
        if w.end <= 4.0:
            assert pred.top(1, classes, w.probs)[0][0] == "red", (w.start, w.end)
        elif w.start >= 4.0:
            assert pred.top(1, classes, w.probs)[0][0] == "blue", (w.start, w.end)
    # the whole-video prediction is one window over every frame
    (whole,) = colour_predictor().predict([video], window=8.0)
    assert len(whole.windows) == 1 and np.array_equal(whole.windows[0].probs, pred.probs)


def test_views_are_batched_across_videos_and_the_order_kept(tmp_path: Path) -> None:
    files = [colour_video(tmp_path / f"{c}.mp4", [c], 1.0) for c in ("red", "blue", "red")]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 5000)
    preds = colour_predictor(as_is=True).predict([files[0], broken, files[1], files[2]])
    assert [Path(p.source).name for p in preds] == ["red.mp4", "broken.mp4", "blue.mp4", "red.mp4"]
    assert [p.top(1, ["red", "blue"])[0][0] for p in preds if p.ok] == ["red", "blue", "red"]
    assert not preds[1].ok and "not a readable video" in preds[1].error
    assert all(p.views == 4 for p in preds if p.ok)  # 2 x 2 views, batches of 5 split videos apart


def test_probe_counts_frames_like_the_shard_builder(tmp_path: Path) -> None:
    from shard_tools.build import probe_bytes

    data = colour_video(tmp_path / "c.mp4", ["green"], 1.5).read_bytes()
    v = probe(data)
    assert (v.frames, v.fps) == (probe_bytes(data)["frames"], 10.0) and v.frames == 15
