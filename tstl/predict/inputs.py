"""What ``tstl predict`` reads: video files, folders, text lists and shard sets -> one
``VideoInput`` per video.

A file is brought to what the model was trained on before anything else: the prepare stage's own
transcode (``pipeline.transcode.transcode``: H.264, the dataset's height or short side, frames
passed through) into a temporary folder, with the prepare stage's checks (empty, truncated, bogus
geometry), and its frames counted as the shard builder counts them
(``shard_tools.build.probe_bytes``: demuxed packets). A run trained on prepared shards therefore
sees the same pixels from a raw file as from its shard (``--as-is`` skips the transcode for files
that are already prepared). A shard sample is used as it is, with its recorded frame count:
exactly ``tstl eval``'s input.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tstl.core.exitcodes import UsageError
from tstl.core.shards import CLS, INDEX, JSON, MP4

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset({".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg",
                            ".flv", ".wmv", ".3gp", ".ogv", ".ts"})
"""File endings a folder is searched for (any container ffmpeg reads works when named directly)."""
LIST_SUFFIXES = frozenset({".txt", ".lst", ".list"})
"""A file with one of these endings lists videos, one path per line (relative to the list's
folder)."""
INPUTS_FIX = "give video files, folders, a text list or a shard set"
TRANSCODE_TIMEOUT_S = 600.0


class InputError(Exception):
    """One video cannot be used (unreadable, empty, truncated, no frames); the batch goes on
    without it."""


@dataclass(frozen=True)
class Video:
    """A video's bytes as the model's decoder reads them, and what ``tstl predict`` needs to know
    about them."""

    data: bytes
    frames: int
    """The exact frame count (demuxed packets, as the shard builder records it)."""
    fps: float
    duration: float


@dataclass
class VideoInput:
    """One video to predict: where it comes from and how to get its bytes (in a worker thread)."""

    source: str
    """What the user named: a file path, or ``<shard set>#<key>`` for a shard sample."""
    key: str
    load: Callable[[], Video] = field(repr=False)
    label: int | None = None
    """The label a shard sample carries (None for files)."""


@dataclass(frozen=True)
class PrepareRule:
    """How a file is normalised before decoding: the run's dataset's transcode (``height`` or
    ``short_side``), or ``as_is`` (decode the file as it is)."""

    height: int | None = 240
    short_side: int | None = None
    as_is: bool = False

    def describe(self) -> str:
        if self.as_is:
            return "as is (no transcode)"
        size = f"short side {self.short_side}" if self.short_side else f"height {self.height}"
        return f"transcoded like the prepare stage (H.264, {size})"

    def to_dict(self) -> dict:
        return {"as_is": self.as_is, "height": self.height, "short_side": self.short_side}


def probe(data: bytes) -> Video:
    """Frame count, fps and duration of video bytes, counted as the shard builder counts them."""
    from shard_tools.build import probe_bytes

    try:
        meta = probe_bytes(data)
    except Exception as e:  # PyAV raises its own error family for every kind of broken input
        raise InputError(f"not a readable video ({type(e).__name__}: {str(e)[:200]})") from None
    if meta["frames"] < 1:
        raise InputError("no video frames")
    return Video(data, int(meta["frames"]), float(meta["fps"]), float(meta["duration"]))


def prepare_file(path: Path, rule: PrepareRule, timeout_s: float = TRANSCODE_TIMEOUT_S) -> Video:
    """A file as the model sees it: the prepare stage's transcode (``rule``) into a temporary
    folder, or as it is."""
    if rule.as_is:
        try:
            return probe(path.read_bytes())
        except OSError as e:
            raise InputError(f"cannot read: {e.strerror or e}") from None
    from pipeline.runner import Item
    from pipeline.transcode import TranscodeParams, transcode

    params = TranscodeParams(height=rule.height, short_side=rule.short_side)
    if not os.access(path, os.R_OK):
        raise InputError("permission denied")
    with tempfile.TemporaryDirectory(prefix="tstl-predict-") as tmp:
        out = Path(tmp) / "video.mp4"
        try:
            result = transcode(Item(path.name, path, out, out.name), params, timeout_s)
        except OSError as e:
            raise InputError(f"cannot transcode: {e}") from None
        # an EnvironmentFault (no ffmpeg, a full temporary disk) is the machine's: it stops the
        # batch (exit 3)
        if result["status"] != "ok":
            raise InputError(result["error"] or result["status"])
        return probe(out.read_bytes())


def _shard_sample(sample: dict) -> Video:
    import json

    missing = [p for p in (CLS, JSON, MP4) if p not in sample]
    if missing:
        raise InputError(f"shard sample without part(s) {', '.join(missing)}")
    try:
        meta = json.loads(sample[JSON])
        return Video(sample[MP4], int(meta["frames"]), float(meta.get("fps") or 0.0),
                     float(meta.get("duration") or 0.0))
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"bad {JSON} part: {e}") from None


def shard_inputs(folder: Path) -> tuple[int, Iterator[VideoInput]]:
    """The samples of a shard set (a folder with ``shards.json``) in order: (count, inputs). They
    are read through the set's index, a few at a time, as the evaluation loader reads them."""
    from tstl.data.reader import SampleReader
    from tstl.data.sources import resolve

    shards = resolve(folder)

    def gen() -> Iterator[VideoInput]:
        reader = SampleReader(shards)
        try:
            for start in range(0, len(shards.rows), 8):
                for sample in reader.fetch(shards.rows[start:start + 8]):
                    yield _shard_input(folder, sample)
        finally:
            reader.close()

    return shards.num_samples, gen()


def _shard_input(folder: Path, sample: dict) -> VideoInput:
    key = sample["__key__"]
    if "_error" in sample:  # could not be read: listed with the reason, the others go on
        def fail(err: str = sample["_error"]) -> Video:
            raise InputError(err)

        return VideoInput(f"{folder}#{key}", key, fail)
    try:
        label = int(sample[CLS]) if CLS in sample else None
    except ValueError:
        label = None
    return VideoInput(f"{folder}#{key}", key, lambda s=sample: _shard_sample(s), label)


def _listed(path: Path) -> list[Path]:
    """Paths of a text list: one per line, blank lines and ``#`` comments skipped, relative to the
    list's folder."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the list {path}: {e}",
                         "give a text file with one video path per line") from None
    out = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line).expanduser()
            out.append(p if p.is_absolute() else Path(os.path.normpath(path.parent / p)))
    return out


def file_input(path: Path, rule: PrepareRule) -> VideoInput:
    def load() -> Video:
        if not path.is_file():
            raise InputError("file not found" if not path.exists() else "not a file")
        return prepare_file(path, rule)

    return VideoInput(str(path), path.stem, load)


def collect(paths: Sequence[str | Path], rule: PrepareRule) -> tuple[int, Iterator[VideoInput]]:
    """Every video named by ``paths`` (files, folders searched recursively, text lists, shard
    sets), in order.

    A path given here that does not exist is a usage error (nothing has run yet); a file named
    inside a list that is missing becomes a failed input, listed with the others.
    """
    parts: list[tuple[int, Iterator[VideoInput]]] = []
    files: list[VideoInput] = []

    def flush() -> None:
        if files:
            parts.append((len(files), iter(list(files))))
            files.clear()

    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise UsageError(f"input not found: {p}", INPUTS_FIX)
        if p.is_dir() and (p / INDEX).is_file():
            flush()
            parts.append(shard_inputs(p))
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*")
                           if f.suffix.lower() in VIDEO_SUFFIXES and f.is_file())
            if not found:
                endings = ", ".join(sorted(VIDEO_SUFFIXES))
                raise UsageError(f"{p}: no video files inside (endings {endings})",
                                 "name the files directly, or give a folder that holds videos")
            files += [file_input(f, rule) for f in found]
        elif p.suffix.lower() in LIST_SUFFIXES:
            files += [file_input(f, rule) for f in _listed(p)]
        else:
            files.append(file_input(p, rule))
    flush()
    if not parts:
        raise UsageError("no inputs", INPUTS_FIX)
    total = sum(n for n, _ in parts)
    return total, (item for _, it in parts for item in it)
