"""Fixtures for ``tstl predict``/``tstl export``: a real (tiny) training run on the shared synthetic
SSV2 set, videos whose frames tell what they are, and runs written by hand for the families no test
trains."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, TINY, subprocess_env
from tests.data.conftest import shardset, videos  # noqa: F401  (shard sets, for the input tests)
from tstl.core.config import dump_yaml, load_cli_config
from tstl.core.ffmpeg import ffmpeg_exe
from tstl.models import create_model
from tstl.train.config import TrainConfig

CONFIGS = [str(ROOT / "configs/data/ssv2.yaml"), str(ROOT / "configs/demo.yaml")]


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add fixed noise to every parameter. B-CAST starts with zero adapters and up-projections
    (CAST's init), so a fresh or briefly trained tiny model scores every video almost alike; after
    this its scores differ per video and per view, so a test comparing top-1 classes or logits can
    fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


@pytest.fixture(scope="session")
def trained_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder written by ``tstl train`` (1 epoch of the tiny B-CAST on the synthetic SSV2
    shards), its checkpoint's weights then perturbed in place (``perturb_``) in DeepSpeed's file."""
    run = tmp_path_factory.mktemp("predict") / "run"
    cmd = [sys.executable, "-m", "tstl.train.cli", "train", "--config", *CONFIGS,
           f"data_dir={data_dir}", f"out_dir={run}", "epochs=1", "test_at_end=false", *TINY]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (states,) = run.glob("checkpoints/*/mp_rank_00_model_states.pt")
    ckpt = torch.load(states, map_location="cpu", weights_only=False)
    model = create_model("bcast_test", num_classes=4)
    model.load_state_dict(ckpt["module"])
    ckpt["module"] = perturb_(model).state_dict()
    torch.save(ckpt, states)
    return run


def hand_run(folder: Path, model_name: str, num_classes: int = 4, seed: int = 0,
             **model_kwargs) -> Path:
    """A checkpoint file (CAST layout, ``{"model": state_dict}``) of a perturbed random
    ``model_name`` and the ``config.yaml`` a run of it would hold (the trainer's writer,
    ``dump_yaml``); returns the checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = perturb_(create_model(model_name, num_classes=num_classes, **model_kwargs), seed)
    ckpt = folder / "model.pt"
    torch.save({"model": model.state_dict()}, ckpt)
    kwargs = [f"model.kwargs.{k}={v}" for k, v in model_kwargs.items()]
    cfg = load_cli_config(TrainConfig, CONFIGS, [*TINY, f"model.name={model_name}",
                                                 f"model.num_classes={num_classes}", *kwargs])
    dump_yaml(cfg, folder / "config.yaml")
    return ckpt


def colour_video(path: Path, colours: list[str], seconds: float, rate: int = 10,
                 size: str = "64x48") -> Path:
    """A video of solid colours, ``seconds`` each, concatenated; lossless (H.264 in .mp4/.mkv, VP9
    in .webm) so the colours stay exact."""
    inputs, labels = [], []
    for i, c in enumerate(colours):
        inputs += ["-f", "lavfi", "-i", f"color=c={c}:size={size}:rate={rate}:duration={seconds}"]
        labels.append(f"[{i}:v]")
    graph = f"{''.join(labels)}concat=n={len(colours)}:v=1:a=0[v]"
    webm = path.suffix == ".webm"
    lossless = ["libvpx-vp9", "-lossless", "1"] if webm else ["libx264", "-qp", "0"]
    subprocess.run([ffmpeg_exe(), "-v", "error", *inputs, "-filter_complex", graph, "-map", "[v]",
                    "-c:v", *lossless, "-pix_fmt", "yuv444p", "-threads", "1", "-y", str(path)],
                   check=True)
    return path
