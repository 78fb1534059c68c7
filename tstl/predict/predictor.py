"""``Predictor``: labels videos with a trained run, with exactly ``tstl eval``'s views and merge
rule.

Per video: its bytes (a file transcoded like the prepare stage, or a shard sample as it is;
``tstl.predict.inputs``), the ``T x C`` test views of ``tstl.data.views.decode_views`` (the
function the evaluation loader calls), batched across videos, normalised by the loader's own
``Normalize`` stage, scored by the model (or TSTL's selector and experts) and merged per video by
``tstl.train.evaluate.merge`` under the run's ``test_merge``. With a window (``window``,
``stride`` seconds) the same is done for every time window as well, each window taken as a video
of its own. A few threads read and decode videos ahead of the model; a video that cannot be used
becomes a failed ``Prediction`` with the reason, and the batch goes on.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import EnvironmentFault
from tstl.data.decode import BadSample
from tstl.data.device import Normalize
from tstl.data.views import decode_views
from tstl.predict.inputs import InputError, PrepareRule, VideoInput, collect
from tstl.predict.runs import LoadedRun, load
from tstl.train.evaluate import merge

logger = logging.getLogger(__name__)


@dataclass
class Window:
    """One time window of a video and its merged class probabilities."""

    start: float
    end: float
    probs: np.ndarray


@dataclass
class Prediction:
    """The result for one video: merged probabilities over the run's classes, or why it failed."""

    source: str
    key: str
    probs: np.ndarray | None = None
    label: int | None = None
    windows: list[Window] = field(default_factory=list)
    error: str | None = None
    views: int = 0
    frames: int = 0
    fps: float = 0.0
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def top(self, k: int, classes: Sequence[str],
            probs: np.ndarray | None = None) -> list[tuple[str, float]]:
        """The ``k`` most probable ``(class name, probability)`` of the video (or of ``probs``)."""
        p = self.probs if probs is None else probs
        order = np.argsort(-p, kind="stable")[:k]
        return [(classes[i], float(p[i])) for i in order]


def windows(duration: float, window_s: float, stride_s: float) -> list[tuple[float, float]]:
    """``[start, end)`` seconds of the windows of a video: every ``stride_s`` from 0 while a whole
    window fits; the rest of the video becomes one shorter last window when it is at least half a
    window long, and a video shorter than one window is one window."""
    if window_s <= 0 or stride_s <= 0:
        raise ValueError("window and stride must be > 0 seconds")
    out = []
    start = 0.0
    while start + window_s <= duration + 1e-6:
        out.append((start, start + window_s))
        start += stride_s
    last_end = out[-1][1] if out else 0.0
    if not out:
        out.append((0.0, duration))
    elif duration - last_end > 1e-6 and duration - start >= window_s / 2:
        out.append((start, duration))
    return out


def frame_span(start: float, end: float, fps: float, frames: int) -> tuple[int, int]:
    """The frames ``[a, b)`` shown in ``[start, end)`` seconds (constant-rate timing; at least one
    frame)."""
    a = min(int(round(start * fps)), frames - 1)
    return a, max(a + 1, min(frames, int(round(end * fps))))


@dataclass
class _Job:
    """A video read and cut into views, waiting for the model: spans[0] is the whole video."""

    item: VideoInput
    pred: Prediction
    spans: list[tuple[float, float]] = field(default_factory=list)
    views: list[list[torch.Tensor]] = field(default_factory=list)
    scores: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)


class Predictor:
    """Predict with a trained run: ``Predictor("runs/demo").predict(["clip.webm", "folder/"])``.

    Args:
        run: a run folder, DeepSpeed tag folder or checkpoint file (as ``tstl eval
            --checkpoint``), or a TSTL run folder; or an already loaded ``LoadedRun``.
        configs, overrides: the run's YAML files (default: its ``config.yaml``) and dotted
            overrides, e.g. ``data.test_views=[1,1]`` or ``data.eval_batch_size=32``.
        device: ``auto`` (a GPU when there is one), ``cpu``, ``cuda``, ``cuda:1``.
        routing: TSTL runs: ``hard`` (the selector's top group's expert) or ``soft`` (the top
            ``soft_top_k`` groups' experts, weighted by the selector).
        classes: a ``classes.txt`` (one name per line) when the run's shard sets are not here.
        as_is: decode files as they are instead of transcoding them like the prepare stage (for
            files that are already prepared mp4s).
        workers: threads reading, transcoding and decoding videos ahead of the model.
    """

    def __init__(self, run: str | Path | LoadedRun, *, configs: Sequence[str | Path] = (),
                 overrides: Sequence[str] = (), device: str = "auto", routing: str = "hard",
                 soft_top_k: int = 2, classes: str | Path | None = None, as_is: bool = False,
                 workers: int = 2) -> None:
        if not isinstance(run, LoadedRun):
            run = load(run, configs=configs, overrides=overrides, device=device, routing=routing,
                       soft_top_k=soft_top_k, classes_file=classes, as_is=as_is)
        self.run = run
        self.workers = max(1, workers)
        data = self.run.data
        self.views = tuple(data.test_views)
        self.batch_size = data.eval_batch_size
        self.normalize = Normalize(data.mean, data.std)
        logger.info("%s; %d classes; %d x %d views per video; inputs %s", self.run.description,
                    len(self.run.classes), *self.views, self.run.prepare.describe())

    @property
    def classes(self) -> list[str]:
        return self.run.classes

    @property
    def prepare(self) -> PrepareRule:
        return self.run.prepare

    # ---- public --------------------------------------------------------------------------
    def predict(self, inputs: Iterable[str | Path] | str | Path, *, window: float | None = None,
                stride: float | None = None, progress: bool = False) -> list[Prediction]:
        """Predictions for every video the inputs name (files, folders, text lists, shard sets),
        in order."""
        return list(self.iter_predict(inputs, window=window, stride=stride, progress=progress))

    def iter_predict(self, inputs: Iterable[str | Path] | str | Path, *,
                     window: float | None = None, stride: float | None = None,
                     progress: bool = False,
                     skip: frozenset[str] = frozenset()) -> Iterator[Prediction]:
        """As :meth:`predict`, one ``Prediction`` at a time as soon as it is ready (``skip``:
        sources to leave out, e.g. those a previous, interrupted run already wrote)."""
        if isinstance(inputs, (str, Path)):
            inputs = [inputs]
        if (window is None) != (stride is None) and window is None:
            raise ValueError("stride needs a window")
        stride = stride if stride is not None else window
        total, items = collect(list(inputs), self.run.prepare)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="predict", unit="video", dynamic_ncols=True,
                       leave=False)

        def todo() -> Iterator[VideoInput]:
            for it in items:
                if it.source not in skip:
                    yield it
                elif bar is not None:
                    bar.update(1)

        try:
            for pred in self._run(todo(), window, stride):
                if bar is not None:
                    bar.update(1)
                yield pred
        finally:
            if bar is not None:
                bar.close()

    # ---- reading videos (worker threads) ----------------------------------------------------
    def _read(self, item: VideoInput, window: float | None, stride: float | None) -> _Job:
        job = _Job(item, Prediction(item.source, item.key, label=item.label))
        try:
            video = item.load()
            job.pred.frames, job.pred.fps = video.frames, video.fps
            # a container without a duration: the frames at their rate
            duration = video.duration or (video.frames / video.fps if video.fps > 0 else 0.0)
            job.pred.duration = duration
            job.spans = [(0.0, duration)]
            job.views = [decode_views(video.data, video.frames, self.run.data, self.views)]
            if window is not None:
                if video.fps <= 0:
                    raise InputError("no frame rate: cannot cut time windows")
                for start, end in windows(duration, window, stride):
                    span = frame_span(start, end, video.fps, video.frames)
                    job.spans.append((start, end))
                    job.views.append(decode_views(video.data, video.frames, self.run.data,
                                                  self.views, span))
        except (InputError, BadSample) as e:
            job.pred.error = str(e)
            job.views = []
        except EnvironmentFault:
            raise  # the machine's (no ffmpeg, a full disk), not the video's: stop
        except Exception as e:  # anything else of one video must not stop the others: reported
            logger.debug("%s", item.source, exc_info=True)
            job.pred.error = f"{type(e).__name__}: {e}"
            job.views = []
        return job

    def _jobs(self, items: Iterator[VideoInput], window: float | None,
              stride: float | None) -> Iterator[_Job]:
        """Read jobs, ``2 x workers`` ahead, in input order."""
        with ThreadPoolExecutor(self.workers, thread_name_prefix="predict-read") as pool:
            ahead: deque[Future] = deque()
            for item in items:
                ahead.append(pool.submit(self._read, item, window, stride))
                while len(ahead) > 2 * self.workers:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()

    # ---- scoring -------------------------------------------------------------------------
    def _score(self, batch: list[tuple[_Job, int, int, torch.Tensor]]) -> None:
        run = self.run
        x = torch.stack([clip for _, _, _, clip in batch])  # uint8 [B, T, S, S, 3]
        x = self.normalize({"video": x.to(run.device)}, 0)["video"].to(run.dtype)
        scores = run.scorer(x)
        for (job, s, v, _), z in zip(batch, scores):
            job.scores[(s, v)] = z

    def _finish(self, job: _Job) -> Prediction:
        pred = job.pred
        if pred.error is not None:
            return pred
        rule = self.run.scorer.merge_rule
        merged = []
        for s in range(len(job.spans)):
            views = {(str(s), v): (job.scores[(s, v)], 0) for v in range(len(job.views[s]))}
            probs, _ = merge([views], rule)
            merged.append(probs[str(s)])
        pred.probs, pred.views = merged[0], len(job.views[0])
        pred.windows = [Window(a, b, p) for (a, b), p in zip(job.spans[1:], merged[1:])]
        job.views = []  # the clips are no longer needed
        return pred

    def _run(self, items: Iterator[VideoInput], window: float | None,
             stride: float | None) -> Iterator[Prediction]:
        pending: list[tuple[_Job, int, int, torch.Tensor]] = []
        waiting: deque[tuple[_Job, int]] = deque()  # jobs in input order, with their view count
        for job in self._jobs(items, window, stride):
            waiting.append((job, sum(len(v) for v in job.views)))
            pending += [(job, s, v, clip) for s, clips in enumerate(job.views)
                        for v, clip in enumerate(clips)]
            while len(pending) >= self.batch_size:
                self._score(pending[:self.batch_size])
                pending = pending[self.batch_size:]
            while waiting and len(waiting[0][0].scores) == waiting[0][1]:
                yield self._finish(waiting.popleft()[0])
        if pending:
            self._score(pending)
        while waiting:
            yield self._finish(waiting.popleft()[0])


def describe(pred: Prediction, classes: Sequence[str], k: int) -> list[str]:
    """Terminal lines of one prediction: the video's top-k, then one line per window."""
    if not pred.ok:
        return [f"{pred.source}: FAILED: {pred.error}"]

    def fmt(probs: np.ndarray) -> str:
        return ", ".join(f"{name} {p:.3f}" for name, p in pred.top(k, classes, probs))

    lines = [f"{pred.source}: {fmt(pred.probs)}"]
    width = max(4, int(math.log10(max(pred.duration, 1))) + 3)
    lines += [f"  [{w.start:{width}.1f} - {w.end:{width}.1f} s] {fmt(w.probs)}"
              for w in pred.windows]
    return lines
