"""A synthetic EPIC-KITCHENS-100-style release: long source videos, each holding several narrations.

Layout under ``<out>/ek100`` (what the official downloader and annotation repository give):

* ``<participant>/videos/<video_id>.MP4``: H.264 at 59.94 fps (``P01_NN``, as the EPIC-KITCHENS-55
  videos) and 50 fps (``P02_1NN``, the extension), 16:9 and one 4:3; each video is a run of narrated
  actions with idle gaps between them (an empty scene), and one narration per video repeats part of
  the one before it (overlapping segments, as the real annotations have);
* ``epic-kitchens-100-annotations/EPIC_100_{train,validation}.csv`` with the official 15 columns
  (``HH:MM:SS.ff`` timestamps, narrations and noun lists with quoted commas) and
  ``EPIC_100_{verb,noun}_classes.csv`` (``id, key, instances, category``).

A verb is a change of the object over its narration (it grows, shrinks, brightens or darkens:
visible only across frames, and the same after the recipe's horizontal flip), a noun is the
object's colour (its hue, visible in any one frame), so a compositional model can learn the verb
from time and the noun from appearance. One listed
training video has no file (a download that never happened) and one validation video ends before its
last two narrations do (a short download): the prepare stage must list those clips with reasons.
"""

from __future__ import annotations

import csv
import io
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.synthetic_io import encode, write_text_atomic

# (key, instances, category, change): how the object changes over the narration, the same after the
# EK100 recipe's horizontal flip and seen in every part of it (a small model learns it in seconds)
VERBS = (("take", ("take", "grab", "pick-up"), "retrieve", "grow"),
         ("put", ("put", "place", "put-down"), "leave", "shrink"),
         ("open", ("open", "unscrew", "open-up"), "access", "brighten"),
         ("close", ("close", "shut", "screw"), "block", "darken"))
# (key, instances, category, RGB colour of the object)
NOUNS = (("plate", ("plate", "dish", "plate:pasta"), "crockery", (225, 45, 40)),
         ("cup", ("cup", "mug", "cup:coffee"), "crockery", (40, 205, 60)),
         ("knife", ("knife", "blade", "knife:bread"), "cutlery", (55, 95, 235)))
COLUMNS = ("narration_id", "participant_id", "video_id", "narration_timestamp", "start_timestamp",
           "stop_timestamp", "start_frame", "stop_frame", "narration", "verb", "verb_class", "noun",
           "noun_class", "all_nouns", "all_noun_classes")
# frame rate (ffmpeg's text, value): EPIC-KITCHENS-55 videos at 59.94, the extension's at 50
RATES = {"P01": ("60000/1001", 60000 / 1001), "P02": ("50", 50.0)}


@dataclass(frozen=True)
class EK100Spec:
    """What to generate (``synthetic.SynthConfig``'s ``ek100_*`` fields and its seed)."""

    seed: int = 0
    train_videos: int = 4
    """Listed training videos (the first has no file)."""
    val_videos: int = 2
    """Listed validation videos (the last is short)."""
    narrations: int = 8
    """Narrations per video, plus one that repeats part of another."""
    sizes: tuple[tuple[int, int], ...] = ((192, 108), (160, 120))
    """(width, height) of the videos, in turn."""


@dataclass
class Segment:
    """One narration: [start, stop) in centiseconds (the release's timestamp precision) and its
    classes."""

    nid: str
    start_cs: int
    stop_cs: int
    verb: int
    noun: int
    repeat: bool = False  # repeats part of the narration before it (not rendered again)


@dataclass
class LongVideoJob:
    """One source video to render: everything a worker process needs."""

    path: str
    rate: str
    fps: float
    width: int
    height: int
    segments: list[Segment]
    seed: tuple[int, ...]
    end_cs: int  # the video's length; a short download ends before its last narrations


def timestamp(cs: int, digits: int = 2) -> str:
    """Centiseconds -> ``HH:MM:SS.ff`` (``digits=3``: ``HH:MM:SS.fff``, the narration_timestamp
    form)."""
    s, frac = divmod(cs, 100)
    h, rem = divmod(s, 3600)
    frac_text = f"{frac:02d}" if digits == 2 else f"{frac * 10:03d}"
    return f"{h:02d}:{rem // 60:02d}:{rem % 60:02d}.{frac_text}"


def _disc(change: str, u: float, size: int) -> tuple[float, float]:
    """Radius and brightness (a factor of the noun's colour) of the object ``u`` of the way through
    a narration whose verb is ``change``."""
    r = 0.4 * size
    if change in ("grow", "shrink"):
        return r * (0.2 + 0.8 * (u if change == "grow" else 1.0 - u)), 1.0
    return r, 0.15 + 0.85 * (u if change == "brighten" else 1.0 - u)


def render(job: LongVideoJob) -> np.ndarray:
    """uint8 ``[T, H, W, 3]``: an empty, grainy scene; during a narration its noun's disc changes by
    its verb."""
    rng = np.random.default_rng(list(job.seed))
    n = math.ceil(job.end_cs / 100 * job.fps)
    base = rng.integers(40, 90, size=3, dtype=np.int16)
    grain = rng.integers(-6, 7, size=(job.height, job.width, 3), dtype=np.int16)
    plate = (base + grain).clip(0, 255)
    frames = np.repeat(plate.astype(np.uint8)[None], n, axis=0)
    yy, xx = np.mgrid[:job.height, :job.width]
    shown = [s for s in job.segments if not s.repeat]
    for i in range(n):
        t_cs = i / job.fps * 100
        seg = next((s for s in shown if s.start_cs <= t_cs < s.stop_cs), None)
        if seg is None:
            continue
        u = (t_cs - seg.start_cs) / (seg.stop_cs - seg.start_cs)
        radius, light = _disc(VERBS[seg.verb][3], u, min(job.width, job.height))
        disc = (yy - job.height / 2) ** 2 + (xx - job.width / 2) ** 2 <= radius**2
        frames[i][disc] = np.round(np.array(NOUNS[seg.noun][3]) * light).astype(np.uint8)
    return frames


def make_long_video(job: LongVideoJob) -> str:
    """Worker entry: render and encode one source video (H.264 in MP4 under its official ``.MP4``
    name)."""
    encode(render(job), Path(job.path), job.rate, "h264")
    return job.path


def _segments(rng: np.random.Generator, vid: str, count: int,
              labels: list[tuple[int, int]]) -> list[Segment]:
    """``count`` narrations of ``labels`` with gaps, then one repeat of part of a narration
    (overlapping)."""
    out, t = [], int(rng.integers(20, 60))
    for k in range(count):
        length = int(rng.integers(100, 200))
        verb, noun = labels[k]
        out.append(Segment(f"{vid}_{k}", t, t + length, verb, noun))
        t += length + int(rng.integers(30, 80))
    if count >= 2:
        j = int(rng.integers(0, count))
        src = out[j]
        out.append(Segment(f"{vid}_{count}", src.start_cs + 20, src.stop_cs, src.verb, src.noun,
                           repeat=True))
    return out


def _narration_row(seg: Segment, participant: str, vid: str, fps: float, comma: bool) -> dict:
    verb_instances = VERBS[seg.verb][1]
    noun_key = NOUNS[seg.noun][0]
    other = NOUNS[(seg.noun + 1) % len(NOUNS)][0]
    nouns, classes = [noun_key], [seg.noun]
    if comma:
        nouns, classes = nouns + [other], classes + [(seg.noun + 1) % len(NOUNS)]
    # the narrated word: an instance of the verb class
    verb_text = verb_instances[seg.start_cs % len(verb_instances)]
    narration = f"{verb_text} {noun_key}" + (f", then the {other}" if comma else "")
    return {"narration_id": seg.nid, "participant_id": participant, "video_id": vid,
            "narration_timestamp": timestamp(seg.start_cs + 45, 3),
            "start_timestamp": timestamp(seg.start_cs), "stop_timestamp": timestamp(seg.stop_cs),
            "start_frame": int(seg.start_cs / 100 * fps),
            "stop_frame": int(seg.stop_cs / 100 * fps), "narration": narration,
            "verb": verb_text, "verb_class": seg.verb, "noun": noun_key, "noun_class": seg.noun,
            "all_nouns": str(nouns), "all_noun_classes": str(classes)}


def plan(cfg: EK100Spec, root: Path) -> tuple[list[LongVideoJob], dict[str, list[dict]], dict]:
    """Jobs, CSV rows per split file and a description of the release."""
    rng = np.random.default_rng([cfg.seed, 4])
    combos = [(v, n) for v in range(len(VERBS)) for n in range(len(NOUNS))]
    videos = [("P01", f"P01_{k + 1:02d}") if k % 2 == 0 else ("P02", f"P02_{101 + k}")
              for k in range(cfg.train_videos + cfg.val_videos)]
    jobs, rows = [], {"EPIC_100_train.csv": [], "EPIC_100_validation.csv": []}
    missing, short = videos[0][1], videos[-1][1]
    info: dict = {"missing_video": missing, "short_video": short, "failed": {}}
    for k, (participant, vid) in enumerate(videos):
        split = "EPIC_100_train.csv" if k < cfg.train_videos else "EPIC_100_validation.csv"
        order = rng.permutation(len(combos))
        labels = [combos[int(order[i % len(combos)])] for i in range(cfg.narrations)]
        segs = _segments(rng, vid, cfg.narrations, labels)
        rate, fps = RATES[participant]
        rows[split] += [_narration_row(s, participant, vid, fps, comma=i == 1)
                        for i, s in enumerate(segs)]
        end = max(s.stop_cs for s in segs) + 50
        if vid == missing:
            info["failed"].update({s.nid: "missing" for s in segs})
            continue
        if vid == short:  # ends 0.3 s into its second-to-last narration; the last is out of reach
            second = sorted((s for s in segs if not s.repeat), key=lambda s: s.start_cs)[-2]
            end = second.start_cs + 30
            info["failed"].update({s.nid: "short" for s in segs if s.stop_cs > end})
        w, h = cfg.sizes[k % len(cfg.sizes)]
        path = root / participant / "videos" / f"{vid}.MP4"
        jobs.append(LongVideoJob(str(path), rate, fps, w, h, segs, (cfg.seed, 4, k), end))
    info["videos"] = len(videos)
    info["narrations"] = {name: len(r) for name, r in rows.items()}
    return jobs, rows, info


def _csv_text(header: tuple[str, ...], rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def class_rows(table: tuple) -> list[dict]:
    """``EPIC_100_<head>_classes.csv`` rows: id, key, instances (a quoted Python list), category."""
    return [{"id": i, "key": key, "instances": str(list(instances)), "category": category}
            for i, (key, instances, category, _) in enumerate(table)]


def write(cfg: EK100Spec, out: Path, jobs_n: int) -> dict:
    """Render the videos and write the annotation files under ``out``; returns the description."""
    jobs, rows, info = plan(cfg, out)
    for j in jobs:
        Path(j.path).parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=max(1, jobs_n)) as pool:
        done = pool.map(make_long_video, jobs)
        for _ in tqdm(done, total=len(jobs), desc="synthetic ek100", unit="video"):
            pass
    ann = out / "epic-kitchens-100-annotations"
    for name, split_rows in rows.items():
        write_text_atomic(ann / name, _csv_text(COLUMNS, split_rows))
    for name, table in (("EPIC_100_verb_classes.csv", VERBS), ("EPIC_100_noun_classes.csv", NOUNS)):
        header = ("id", "key", "instances", "category")
        write_text_atomic(ann / name, _csv_text(header, class_rows(table)))
    info["verbs"], info["nouns"] = [v[0] for v in VERBS], [n[0] for n in NOUNS]
    return info

