"""Synthetic SSV2-, UCF101-, Kinetics-400- and EPIC-KITCHENS-100-style datasets in the official
on-disk layouts.

Every class is the same textured object on a textured background; classes differ only in the
*motion*: left to right vs right to left, up vs down, clockwise vs counter-clockwise rotation,
approaching vs receding. A single frame therefore carries no class information, a model that ignores
frame order cannot separate the pairs, and a horizontal flip turns "left to right" into "right to
left" (and clockwise into counter-clockwise) -- exactly the properties that make SSV2
direction-sensitive.

Layouts written under ``--out``:

* ``ssv2/20bn-something-something-v2/<id>.webm`` (VP9, 240 px high, varied widths, durations and
  frame rates) and ``ssv2/labels/{labels,train,validation,test}.json`` in the official JSON formats;
* ``ucf101/UCF-101/<Class>/v_<Class>_gGG_cCC.avi`` (MPEG-4 Part 2 in AVI, like the Xvid originals)
  and ``ucf101/ucfTrainTestlist/{classInd.txt,trainlist0k.txt,testlist0k.txt}``, including the real
  ``HandstandPushups``/``v_HandStandPushups_*`` case mismatch;
* ``kinetics400/{train,val,test}/<youtube_id>_<start:06d>_<end:06d>.mp4`` (H.264 at a few sizes and
  frame rates, portrait ones too) and ``kinetics400/annotations/{train,val,test}.csv``
  (``label,youtube_id,time_start,time_end,split``, ``is_cc`` in train, no labels in test), with
  every distribution layout mixed in: a few clips in class folders
  (``train/<class_name>/<name>.mp4``), a few untrimmed downloads (``<split>/<youtube_id>.mp4``
  holding more than the segment), listed clips with no file (YouTube removals) and a broken file;
* ``ek100/<participant>/videos/<video_id>.MP4`` (long videos, several narrations each) and
  ``ek100/epic-kitchens-100-annotations/EPIC_100_*.csv`` in the official columns
  (``pipeline.synthetic_ek100``);
* ``synthetic_info.json`` describing what was generated (seed, classes, broken files).

A few deliberately broken files (zero-byte, truncated, not a video) are listed in the annotations
like any other video so the preparation stage meets them. Output is deterministic for a seed: each
video has its own RNG stream, so the number of worker processes does not matter.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import synthetic_ek100
from pipeline.synthetic_io import encode, write_text_atomic

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MotionClass:
    """One motion class: how the object moves, and its name in each dataset's convention."""

    motion: str
    ssv2_template: str
    ucf_name: str


# The order is the class index of the SSV2-style dataset. UCF101 indices follow classInd.txt
# (alphabetical).
CLASSES: tuple[MotionClass, ...] = (
    MotionClass("left_to_right", "Pushing [something] from left to right", "SlideLeftToRight"),
    MotionClass("right_to_left", "Pushing [something] from right to left", "SlideRightToLeft"),
    MotionClass("up", "Moving [something] up", "HandstandPushups"),
    MotionClass("down", "Moving [something] down", "FallDown"),
    MotionClass("clockwise", "Turning [something] clockwise", "SpinClockwise"),
    MotionClass("counterclockwise", "Turning [something] counterclockwise", "SpinCounterClockwise"),
    MotionClass("approach", "Moving [something] towards the camera", "Approach"),
    MotionClass("recede", "Moving [something] away from the camera", "Recede"),
)
# UCF101's folder is "HandstandPushups" but its files are "v_HandStandPushups_*": reproduce that
# quirk.
UCF_FILE_PREFIX = {"HandstandPushups": "HandStandPushups"}
NOUNS = ("box", "cup", "book", "pen", "ball", "phone", "bottle", "remote", "wallet", "spoon")
BROKEN_KINDS = ("zero-byte", "truncated", "not-a-video")


@dataclass
class SynthConfig:
    """What to generate. ``preset`` fills the sizes; explicit arguments override it."""

    seed: int = 0
    num_classes: int = 8
    videos_per_class: int = 6
    ucf_groups_per_class: int = 3
    ucf_clips_per_group: int = 2
    ssv2_fps: tuple[int, ...] = (12, 12, 12, 15)
    ssv2_widths: tuple[int, ...] = (160, 176, 213, 240)
    duration_s: tuple[float, float] = (2.0, 3.0)
    ucf_size: tuple[int, int] = (160, 120)
    ucf_fps: int = 25
    broken_ssv2: int = 3
    broken_ucf: int = 1
    # (width, height); portrait too
    k400_sizes: tuple[tuple[int, int], ...] = ((160, 120), (128, 96), (96, 128))
    k400_fps: tuple[int, ...] = (24, 25, 30)
    broken_k400: int = 1
    missing_k400: int = 2      # listed in the CSVs, no file (YouTube removals)
    untrimmed_k400: int = 2    # whole-video downloads the stage cuts to [time_start, time_end]
    class_folder_k400: int = 2  # clips in <split>/<class>/ instead of the flat layout
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    # EK100-style source videos per split (one train video is listed but missing, one val video is
    # short), each with ek100_narrations narrations (+ one repeat); (width, height) 16:9 and one 4:3
    ek100_train_videos: int = 4
    ek100_val_videos: int = 2
    ek100_narrations: int = 8
    ek100_sizes: tuple[tuple[int, int], ...] = ((192, 108), (160, 120))
    # "texture" (hard: the object hides in clutter) or "plain" (noise on a flat colour)
    background: str = "texture"

    def __post_init__(self) -> None:
        if not 2 <= self.num_classes <= len(CLASSES):
            raise ValueError(f"num_classes must be in 2..{len(CLASSES)}, got {self.num_classes}")
        if self.videos_per_class < 3:
            raise ValueError("videos_per_class must be >= 3 (one per split)")
        if self.ucf_groups_per_class < 3:
            raise ValueError("ucf_groups_per_class must be >= 3 so each of the three "
                             "splits has test groups")
        if self.ek100_train_videos < 2 or self.ek100_val_videos < 2 or self.ek100_narrations < 3:
            raise ValueError("ek100_train_videos and ek100_val_videos must be >= 2 (one of each is "
                             "missing or short on purpose) and ek100_narrations >= 3")


PRESETS: dict[str, dict] = {
    "ci": {},
    # Enough clips for a small model to learn the motions in a few CPU minutes; clips stay short and
    # narrow. A plain background keeps the object visible at the 32 px a CPU demo can afford; the
    # classes stay motion-only.
    "demo": {"videos_per_class": 40, "ucf_groups_per_class": 6, "ucf_clips_per_group": 4,
             "background": "plain", "ek100_train_videos": 12, "ek100_val_videos": 4,
             "ek100_narrations": 24},
}


@dataclass
class VideoJob:
    """One video to render: everything a worker process needs, and nothing else."""

    path: str
    class_index: int
    seed: tuple[int, ...]
    width: int
    height: int
    fps: int
    num_frames: int
    codec: str
    broken: str | None = None
    background: str = "texture"


# ---------------------------------------------------------------------------------------- rendering


def _texture(rng: np.random.Generator, h: int, w: int, scale: int) -> np.ndarray:
    """Smooth random colour texture (upsampled noise), uint8 [h, w, 3]."""
    coarse = rng.integers(0, 256, size=(h // scale + 2, w // scale + 2, 3), dtype=np.uint8)
    ys = np.arange(h) * coarse.shape[0] // (h + 1)
    xs = np.arange(w) * coarse.shape[1] // (w + 1)
    return coarse[ys][:, xs]


def _object_patch(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured, asymmetric object (so rotation is visible) and its alpha mask."""
    tex = _texture(rng, size, size, max(2, size // 6))
    # A bright bar from the centre to the rim marks the orientation, so rotation is easy to see.
    tex[size // 2 - size // 10 : size // 2 + size // 10,
        size // 2 : size - size // 8] = (255, 255, 255)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    mask = (yy**2 + xx**2) <= (size / 2) ** 2 * 0.95
    return tex, mask


def _warp(tex: np.ndarray, mask: np.ndarray, angle: float,
          scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate (radians, clockwise on screen) and scale a patch with nearest-neighbour sampling."""
    size = tex.shape[0]
    out = max(2, int(round(size * scale)))
    yy, xx = np.mgrid[:out, :out] - (out - 1) / 2
    # Inverse map: screen y grows downwards, so a positive angle turns the content clockwise.
    c, s = np.cos(angle), np.sin(angle)
    src_x = (c * xx + s * yy) / scale + (size - 1) / 2
    src_y = (-s * xx + c * yy) / scale + (size - 1) / 2
    xi, yi = np.rint(src_x).astype(int), np.rint(src_y).astype(int)
    valid = (xi >= 0) & (xi < size) & (yi >= 0) & (yi < size)
    xi, yi = np.clip(xi, 0, size - 1), np.clip(yi, 0, size - 1)
    return tex[yi, xi], mask[yi, xi] & valid


def _trajectory(motion: str, rng: np.random.Generator, w: int, h: int,
                n: int) -> dict[str, np.ndarray]:
    """Per-frame centre (x, y), rotation angle and scale for a motion class."""
    t = np.linspace(0.0, 1.0, n)
    cx = np.full(n, rng.uniform(0.35, 0.65) * w)
    cy = np.full(n, rng.uniform(0.35, 0.65) * h)
    angle = np.full(n, rng.uniform(0, 2 * np.pi))
    scale = np.full(n, rng.uniform(0.8, 1.1))
    a, b = rng.uniform(0.15, 0.35), rng.uniform(0.65, 0.85)
    if motion in ("left_to_right", "right_to_left"):
        x0, x1 = (a, b) if motion == "left_to_right" else (b, a)
        cx = (x0 + (x1 - x0) * t) * w
    elif motion in ("up", "down"):
        y0, y1 = (b, a) if motion == "up" else (a, b)
        cy = (y0 + (y1 - y0) * t) * h
    elif motion in ("clockwise", "counterclockwise"):
        turn = rng.uniform(0.6, 1.0) * np.pi * (1 if motion == "clockwise" else -1)
        angle = angle[0] + turn * t
    elif motion in ("approach", "recede"):
        s0, s1 = (0.55, 1.35) if motion == "approach" else (1.35, 0.55)
        scale = s0 + (s1 - s0) * t
    else:  # pragma: no cover - guarded by CLASSES
        raise ValueError(motion)
    return {"cx": cx, "cy": cy, "angle": angle, "scale": scale}


def render_frames(motion: str, seed: tuple[int, ...], width: int, height: int, num_frames: int,
                  background: str = "texture") -> np.ndarray:
    """Render one clip as uint8 [T, H, W, 3]; fully determined by the arguments."""
    rng = np.random.default_rng(list(seed))
    # A dimmer background keeps the object salient at the low resolutions small models train on.
    plate = _texture(rng, height, width, scale=int(rng.integers(6, 16))) // 2 + 40
    if background == "plain":
        colour = rng.integers(30, 90, size=3)
        plate = ((colour + rng.integers(-8, 9, size=(height, width, 3)))
                 .clip(0, 255).astype(np.uint8))
    tex, mask = _object_patch(rng, int(min(width, height) * rng.uniform(0.28, 0.38)))
    traj = _trajectory(motion, rng, width, height, num_frames)
    frames = np.repeat(plate[None], num_frames, axis=0)
    for i in range(num_frames):
        patch, pmask = _warp(tex, mask, traj["angle"][i], traj["scale"][i])
        ph, pw = pmask.shape
        y0, x0 = int(round(traj["cy"][i] - ph / 2)), int(round(traj["cx"][i] - pw / 2))
        ys, xs = slice(max(y0, 0), min(y0 + ph, height)), slice(max(x0, 0), min(x0 + pw, width))
        py, px = slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0)
        region = frames[i, ys, xs]
        region[pmask[py, px]] = patch[py, px][pmask[py, px]]
    return frames


# ---------------------------------------------------------------------------------------- encoding


def _break(path: Path, kind: str) -> None:
    """Damage an encoded file the way real datasets are damaged."""
    if kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "not-a-video":
        path.write_text("<html><body>404 Not Found</body></html>\n")
    else:
        raise ValueError(kind)


def make_video(job: VideoJob) -> str:
    """Worker entry: render, encode and (optionally) damage one video. Returns its path."""
    path = Path(job.path)
    frames = render_frames(CLASSES[job.class_index].motion, job.seed, job.width, job.height,
                           job.num_frames, job.background)
    encode(frames, path, job.fps, job.codec)
    if job.broken:
        _break(path, job.broken)
    return job.path


# ---------------------------------------------------------------------------------------- layouts


def _num_frames(rng: np.random.Generator, cfg: SynthConfig, fps: int) -> int:
    return max(8, int(round(rng.uniform(*cfg.duration_s) * fps)))


def _split_counts(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    n_val = max(1, int(round(n * fractions[1])))
    n_test = max(1, int(round(n * fractions[2])))
    return n - n_val - n_test, n_val, n_test


def plan_ssv2(cfg: SynthConfig, root: Path) -> tuple[list[VideoJob], dict]:
    """Jobs and annotation JSON contents for the SSV2-style dataset."""
    rng = np.random.default_rng([cfg.seed, 1])
    classes = CLASSES[: cfg.num_classes]
    total = cfg.num_classes * cfg.videos_per_class
    ids = rng.permutation(np.arange(1, total + 1))  # shuffled ids, like the real numbering
    jobs, splits = [], {"train": [], "validation": [], "test": []}
    counts = _split_counts(cfg.videos_per_class, cfg.split_fractions)
    vid_dir = root / "20bn-something-something-v2"
    k = 0
    for c, cls in enumerate(classes):
        for i in range(cfg.videos_per_class):
            vid = str(int(ids[k]))
            k += 1
            split = ("train" if i < counts[0] else "validation" if i < counts[0] + counts[1]
                     else "test")
            fps = int(rng.choice(cfg.ssv2_fps))
            noun = str(rng.choice(NOUNS))
            jobs.append(VideoJob(str(vid_dir / f"{vid}.webm"), c, (cfg.seed, 1, int(vid)),
                                 int(rng.choice(cfg.ssv2_widths)),
                                 240, fps, _num_frames(rng, cfg, fps), "vp9",
                                 background=cfg.background))
            template = cls.ssv2_template
            entry = {"id": vid, "label": template.replace("[something]", noun).lower(),
                     "template": template, "placeholders": [noun]}
            splits[split].append(entry if split != "test" else {"id": vid})
    # Deliberately broken videos: drawn from the labelled splits so the preparation stage meets
    # them.
    labelled = [
        j for j in jobs
        if any(e["id"] == Path(j.path).stem for e in splits["train"] + splits["validation"])]
    for n, j in enumerate(rng.choice(len(labelled), size=min(cfg.broken_ssv2, len(labelled)),
                                     replace=False)):
        labelled[int(j)].broken = BROKEN_KINDS[n % len(BROKEN_KINDS)]
    labels = {cls.ssv2_template.replace("[", "").replace("]", ""): str(c)
              for c, cls in enumerate(classes)}
    for split in splits.values():
        split.sort(key=lambda e: int(e["id"]))
    return jobs, {"labels": labels, **splits}


def plan_ucf101(cfg: SynthConfig, root: Path) -> tuple[list[VideoJob], dict[str, list[str]]]:
    """Jobs and split-list contents for the UCF101-style dataset (three official-style splits by
    group)."""
    rng = np.random.default_rng([cfg.seed, 2])
    # classInd.txt is alphabetical
    names = sorted(cls.ucf_name for cls in CLASSES[: cfg.num_classes])
    motion_of = {cls.ucf_name: i for i, cls in enumerate(CLASSES)}
    lists: dict[str, list[str]] = {"classInd.txt": [f"{i + 1} {n}" for i, n in enumerate(names)]}
    for k in (1, 2, 3):
        lists[f"trainlist0{k}.txt"], lists[f"testlist0{k}.txt"] = [], []
    jobs = []
    w, h = cfg.ucf_size
    for label, name in enumerate(names):
        prefix = UCF_FILE_PREFIX.get(name, name)
        for g in range(1, cfg.ucf_groups_per_class + 1):
            for c in range(1, cfg.ucf_clips_per_group + 1):
                rel = f"{name}/v_{prefix}_g{g:02d}_c{c:02d}.avi"
                jobs.append(VideoJob(str(root / "UCF-101" / rel), motion_of[name],
                                     (cfg.seed, 2, label, g, c), w, h, cfg.ucf_fps,
                                     _num_frames(rng, cfg, cfg.ucf_fps), "mpeg4",
                                     background=cfg.background))
                for k in (1, 2, 3):
                    # Like the official protocol, a whole group is either train or test in a split.
                    if (g - 1) % 3 == k - 1:
                        lists[f"testlist0{k}.txt"].append(rel)
                    else:
                        lists[f"trainlist0{k}.txt"].append(f"{rel} {label + 1}")
    for n, j in enumerate(rng.choice(len(jobs), size=min(cfg.broken_ucf, len(jobs)),
                                     replace=False)):
        jobs[int(j)].broken = BROKEN_KINDS[(n + 1) % len(BROKEN_KINDS)]
    return jobs, lists


K400_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def k400_class_name(cls: MotionClass) -> str:
    """Kinetics-style class name: lower case with spaces (``left to right``)."""
    return cls.motion.replace("_", " ")


def plan_kinetics400(cfg: SynthConfig,
                     root: Path) -> tuple[list[VideoJob], dict[str, list[dict]], dict]:
    """Jobs, CSV rows per split and a description (missing, untrimmed, class-folder clips) of the
    K400-style set."""
    rng = np.random.default_rng([cfg.seed, 3])
    classes = CLASSES[: cfg.num_classes]
    counts = _split_counts(cfg.videos_per_class, cfg.split_fractions)
    jobs: list[VideoJob] = []
    rows: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    clips = []  # (split, class index, youtube id, start, end)
    for c, _cls in enumerate(classes):
        for i in range(cfg.videos_per_class):
            split = "train" if i < counts[0] else "val" if i < counts[0] + counts[1] else "test"
            yid = "".join(K400_ID_CHARS[int(k)] for k in rng.integers(0, len(K400_ID_CHARS), 11))
            start = int(rng.integers(0, 300))
            clips.append((split, c, yid, start, start + 10))
    labelled = [n for n, clip in enumerate(clips) if clip[0] != "test"]
    picks = [int(n) for n in rng.permutation(labelled)]
    missing = set(picks[: cfg.missing_k400])
    untrimmed = set(picks[cfg.missing_k400: cfg.missing_k400 + cfg.untrimmed_k400])
    folders = set(
        picks[len(missing) + len(untrimmed): len(missing) + len(untrimmed) + cfg.class_folder_k400])
    broken = picks[len(missing) + len(untrimmed) + len(folders):][: cfg.broken_k400]
    info: dict = {"missing": [], "untrimmed": {}, "class_folders": [], "broken": {}}
    for n, (split, c, yid, start, end) in enumerate(clips):
        name = f"{yid}_{start:06d}_{end:06d}"
        w, h = cfg.k400_sizes[n % len(cfg.k400_sizes)]
        fps = int(cfg.k400_fps[n % len(cfg.k400_fps)])
        label = k400_class_name(classes[c]) if split != "test" else ""
        row = {"label": label, "youtube_id": yid, "time_start": start, "time_end": end,
               "split": split}
        if split == "train":
            row["is_cc"] = 0
        rows[split].append(row)
        if n in missing:
            info["missing"].append(name)
            continue
        if n in untrimmed:
            # the whole "YouTube video": 1 s before the segment and 0.5 s after, so the cut is
            # visible; the CSV's segment is rewritten to [1, 1 + clip length] of it
            seconds = float(rng.uniform(*cfg.duration_s))
            row["time_start"], row["time_end"] = 1, 1 + int(np.ceil(seconds))
            name = f"{yid}_{1:06d}_{row['time_end']:06d}"
            path = root / split / f"{yid}.mp4"
            frames = round((row["time_end"] + 0.5) * fps)
            info["untrimmed"][name] = row["time_end"] - row["time_start"]
        else:
            path = root / split / (classes[c].motion if n in folders else "") / f"{name}.mp4"
            frames = _num_frames(rng, cfg, fps)
            if n in folders:
                info["class_folders"].append(name)
        job = VideoJob(str(path), c, (cfg.seed, 3, n), w, h, fps, frames, "h264",
                       background=cfg.background)
        if n in broken:
            job.broken = "truncated"
            info["broken"][name] = "truncated"
        jobs.append(job)
    for split_rows in rows.values():
        split_rows.sort(key=lambda r: r["youtube_id"])
    return jobs, rows, info


def _write_k400_csv(path: Path, rows: list[dict]) -> None:
    columns = ["label", "youtube_id", "time_start", "time_end", "split"] + (
        ["is_cc"] if rows and "is_cc" in rows[0] else [])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def _render_all(jobs: list[VideoJob], jobs_n: int, desc: str) -> None:
    for j in jobs:
        Path(j.path).parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=jobs_n) as pool:
        for _ in tqdm(pool.map(make_video, jobs, chunksize=1), total=len(jobs), desc=desc,
                      unit="video"):
            pass


def generate(cfg: SynthConfig, out: Path, datasets: tuple[str, ...] = ("ssv2", "ucf101"),
             jobs: int = 0) -> dict:
    """Write the requested synthetic datasets under ``out``; returns the info written to
    ``synthetic_info.json``."""
    jobs = jobs or os.cpu_count() or 1
    info: dict = {"seed": cfg.seed, "config": asdict(cfg),
                  "classes": [asdict(c) for c in CLASSES[: cfg.num_classes]]}
    if "ssv2" in datasets:
        root = out / "ssv2"
        vids, ann = plan_ssv2(cfg, root)
        _render_all(vids, jobs, "synthetic ssv2")
        for name, content in ann.items():
            write_text_atomic(root / "labels" / f"{name}.json", json.dumps(content, indent=1))
        info["ssv2"] = {"videos": len(vids),
                        "splits": {k: len(v) for k, v in ann.items() if k != "labels"},
                        "broken": {Path(j.path).stem: j.broken for j in vids if j.broken}}
    if "ucf101" in datasets:
        root = out / "ucf101"
        vids, lists = plan_ucf101(cfg, root)
        _render_all(vids, jobs, "synthetic ucf101")
        for name, lines in lists.items():
            text = "".join(f"{ln}\r\n" for ln in lines)
            write_text_atomic(root / "ucfTrainTestlist" / name, text)
        info["ucf101"] = {"videos": len(vids),
                          "broken": {str(Path(j.path).relative_to(root / "UCF-101")): j.broken
                                     for j in vids if j.broken}}
    if "ek100" in datasets:
        spec = synthetic_ek100.EK100Spec(cfg.seed, cfg.ek100_train_videos, cfg.ek100_val_videos,
                                         cfg.ek100_narrations, cfg.ek100_sizes)
        info["ek100"] = synthetic_ek100.write(spec, out / "ek100", jobs)
    if "kinetics400" in datasets:
        root = out / "kinetics400"
        vids, rows, k400 = plan_kinetics400(cfg, root)
        _render_all(vids, jobs, "synthetic kinetics400")
        for split, split_rows in rows.items():
            _write_k400_csv(root / "annotations" / f"{split}.csv", split_rows)
        info["kinetics400"] = {"videos": len(vids), "splits": {k: len(v) for k, v in rows.items()},
                               "classes": sorted(k400_class_name(c)
                                                 for c in CLASSES[: cfg.num_classes]), **k400}
    write_text_atomic(out / "synthetic_info.json", json.dumps(info, indent=1))
    logger.info("synthetic datasets written under %s: %s", out,
                ", ".join(f"{d} {info[d]['videos']} videos" for d in datasets))
    return info


def main(argv: list[str] | None = None, prog: str = "python -m pipeline.synthetic") -> int:
    from tstl.core import exitcodes
    from tstl.core.log import init_logging

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog=prog,
                                epilog=exitcodes.EPILOG)
    p.add_argument("--out", type=Path, required=True,
                   help="folder to write ssv2/, ucf101/ (kinetics400/, ek100/) into")
    p.add_argument("--preset", choices=sorted(PRESETS), default="ci",
                   help="size preset (default: ci, tiny)")
    p.add_argument("--datasets", default="ssv2,ucf101",
                   help="comma-separated subset of ssv2,ucf101,kinetics400,ek100 (default "
                        "ssv2,ucf101)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--num-classes", type=int,
                   help=f"number of motion classes, 2..{len(CLASSES)} (default 8)")
    p.add_argument("--videos-per-class", type=int, help="SSV2-style videos per class")
    p.add_argument("--broken-ssv2", type=int, help="deliberately broken SSV2 files (default 3)")
    p.add_argument("--broken-ucf", type=int, help="deliberately broken UCF101 files (default 1)")
    p.add_argument("--jobs", type=int, default=0, help="worker processes (default: all cores)")
    args = p.parse_args(argv)
    init_logging()
    overrides = {k: v for k, v in vars(args).items()
                 if k in ("seed", "num_classes", "videos_per_class", "broken_ssv2", "broken_ucf")
                 and v is not None}
    datasets = tuple(d.strip() for d in args.datasets.split(",") if d.strip())
    known = ("ssv2", "ucf101", "kinetics400", "ek100")
    if not datasets or (unknown := [d for d in datasets if d not in known]):
        p.error(f"--datasets {args.datasets}: {', '.join(unknown) if datasets else 'empty'}: "
                f"choose from {','.join(known)}")
    try:
        cfg = SynthConfig(**{**PRESETS[args.preset], **overrides})
    except (TypeError, ValueError) as e:
        return exitcodes.usage_error(e)
    generate(cfg, args.out, datasets, args.jobs)
    return exitcodes.OK


def run() -> None:
    """Console-script entry point (``tstl-synthetic``, an alias of ``tstl synthetic``)."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
