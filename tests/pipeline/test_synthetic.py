"""The synthetic datasets: official layouts, determinism, broken files and motion-only class
information."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.synthetic import CLASSES, SynthConfig, generate, render_frames

CFG = SynthConfig(seed=3, num_classes=8, videos_per_class=3, ucf_groups_per_class=3,
                  ucf_clips_per_group=1, broken_ssv2=3, broken_ucf=1, duration_s=(1.0, 1.5))


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    return out, generate(CFG, out, jobs=2)


def _decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_ssv2_layout_and_official_json(synth: tuple[Path, dict]) -> None:
    out, _info = synth
    labels = json.loads((out / "ssv2/labels/labels.json").read_text())
    assert (len(labels) == 8 and all("[" not in k for k in labels)
            and sorted(labels.values(), key=int) == [str(i) for i in range(8)])
    train = json.loads((out / "ssv2/labels/train.json").read_text())
    val = json.loads((out / "ssv2/labels/validation.json").read_text())
    test = json.loads((out / "ssv2/labels/test.json").read_text())
    assert len(train) + len(val) + len(test) == 24
    assert all(set(e) == {"id"} for e in test)
    for e in train + val:
        assert set(e) == {"id", "label", "template", "placeholders"}
        # the MMAction2/CAST label rule
        assert e["template"].replace("[", "").replace("]", "") in labels
        assert e["placeholders"][0] in e["label"]
    ids = [e["id"] for e in train + val + test]
    assert len(set(ids)) == len(ids)
    videos = {p.stem for p in (out / "ssv2/20bn-something-something-v2").glob("*.webm")}
    assert videos == set(ids)


def test_ssv2_videos_are_vp9_240_high_with_varied_geometry(synth: tuple[Path, dict]) -> None:
    out, info = synth
    widths, rates = set(), set()
    for p in sorted((out / "ssv2/20bn-something-something-v2").glob("*.webm")):
        if p.stem in info["ssv2"]["broken"]:
            continue
        with av.open(str(p)) as c:
            s = c.streams.video[0]
            assert s.codec_context.name == "vp9" and s.height == 240
            widths.add(s.width)
            rates.add(int(s.average_rate))
    assert len(widths) > 1 and any(w % 2 for w in widths)


def test_broken_files_are_listed_and_broken(synth: tuple[Path, dict]) -> None:
    out, info = synth
    broken = info["ssv2"]["broken"]
    assert sorted(broken.values()) == ["not-a-video", "truncated", "zero-byte"]
    listed = {e["id"] for name in ("train", "validation")
              for e in json.loads((out / f"ssv2/labels/{name}.json").read_text())}
    assert set(broken) <= listed
    for vid, kind in broken.items():
        path = out / "ssv2/20bn-something-something-v2" / f"{vid}.webm"
        if kind == "zero-byte":
            assert path.stat().st_size == 0
        else:
            with pytest.raises((av.error.FFmpegError, av.error.InvalidDataError, ValueError,
                                IndexError)):
                frames = _decode(path)
                if kind == "truncated" and len(frames) < 8:
                    # decodes partially: fewer frames than any generated clip
                    raise ValueError("truncated")
    assert len(info["ucf101"]["broken"]) == 1


def test_ucf101_layout_lists_and_handstand_quirk(synth: tuple[Path, dict]) -> None:
    out, _ = synth
    lists = out / "ucf101/ucfTrainTestlist"
    class_ind = [ln.split() for ln in (lists / "classInd.txt").read_text().splitlines()]
    names = [n for _, n in class_ind]
    assert [int(i) for i, _ in class_ind] == list(range(1, 9)) and names == sorted(names)
    assert "HandstandPushups" in names
    for k in (1, 2, 3):
        train = [ln.split() for ln in (lists / f"trainlist0{k}.txt").read_text().splitlines()]
        test = (lists / f"testlist0{k}.txt").read_text().split()
        assert all(len(t) == 2 and 1 <= int(t[1]) <= 8 for t in train) and test
        train_groups = {t[0].rsplit("_c", 1)[0] for t in train}
        # groups never straddle train/test
        assert not train_groups & {t.rsplit("_c", 1)[0] for t in test}
        for rel, label in train:
            assert (out / "ucf101/UCF-101" / rel).exists()
            assert names[int(label) - 1] == rel.split("/")[0]
    quirk = list((out / "ucf101/UCF-101/HandstandPushups").glob("*.avi"))
    assert quirk and all(p.name.startswith("v_HandStandPushups_") for p in quirk)


def test_generation_is_deterministic(synth: tuple[Path, dict], tmp_path: Path) -> None:
    _out, _ = synth
    cfg = SynthConfig(**{**CFG.__dict__, "num_classes": 2})
    generate(cfg, tmp_path, datasets=("ssv2",), jobs=1)
    first_train = json.loads((tmp_path / "ssv2/labels/train.json").read_text())
    again = tmp_path / "again"
    generate(cfg, again, datasets=("ssv2",), jobs=2)
    assert json.loads((again / "ssv2/labels/train.json").read_text()) == first_train
    for p in (tmp_path / "ssv2/20bn-something-something-v2").glob("*.webm"):
        assert p.read_bytes() == (again / "ssv2/20bn-something-something-v2" / p.name).read_bytes()


def _centroid(frames: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Centre of the pixels that differ from the (static) background, per frame: [T, (y, x)]."""
    moving = np.abs(frames.astype(int) - background.astype(int)).sum(-1) > 0
    ys, xs = np.mgrid[: frames.shape[1], : frames.shape[2]]
    return np.stack([[(ys * m).sum() / m.sum(), (xs * m).sum() / m.sum()] for m in moving])


def _background(motion: str, seed: tuple[int, ...]) -> np.ndarray:
    # The median over a long clip of the moving object recovers the static background.
    return np.median(render_frames(motion, seed, 160, 240, 24), axis=0).astype(np.uint8)


@pytest.mark.parametrize("motion,axis,sign", [("left_to_right", 1, 1), ("right_to_left", 1, -1),
                                              ("up", 0, -1), ("down", 0, 1)])
def test_objects_move_in_the_labelled_direction(motion: str, axis: int, sign: int) -> None:
    seed = (7, 1, 99)
    frames = render_frames(motion, seed, 160, 240, 24)
    c = _centroid(frames, _background(motion, seed))
    assert sign * (c[-1, axis] - c[0, axis]) > 30


def test_flip_turns_left_to_right_into_right_to_left_and_frames_alone_carry_no_label() -> None:
    seed = (7, 1, 5)
    frames = render_frames("left_to_right", seed, 160, 240, 24)
    flipped = frames[:, :, ::-1]
    c = _centroid(flipped, _background("left_to_right", seed)[:, ::-1])
    assert c[-1, 1] < c[0, 1]  # a flipped "left to right" clip moves right to left
    # the same frames in another order are a valid "right to left" clip
    reversed_clip = frames[::-1]
    c_rev = _centroid(reversed_clip, _background("left_to_right", seed))
    assert c_rev[-1, 1] < c_rev[0, 1]
    assert {c.motion for c in CLASSES} >= {"clockwise", "counterclockwise", "approach", "recede"}
