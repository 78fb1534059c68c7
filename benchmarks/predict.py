"""``tstl predict`` throughput on CPU against ``tstl eval``'s loop, on the same videos, views and
model.

The videos are the demo's: a synthetic SSV2-style release (``tstl synthetic --preset demo`` clips,
plain background), prepared and sharded as ``make demo`` does. The model is the demo's
``bcast_small_demo`` with its recipe (``configs/data/ssv2.yaml`` + ``configs/demo.yaml``: 8
frames at 32 px, 2 x 3 views), random weights (the cost does not depend on them). Rows, each
timed on the validation videos:

* ``tstl eval``: the evaluation loader over the shard set (``data.num_workers`` worker
  processes decoding) and ``tstl.train.evaluate.evaluate`` (what ``evaluate_checkpoint`` runs,
  without the report);
* ``tstl predict``, shard set: the same shard set through ``Predictor`` (no transcode);
* ``tstl predict``, raw ``.webm`` files: every file transcoded like the prepare stage first.

Model loading is outside the timings; the first pass of each row is a warm-up and the fastest of
``--repeats`` counts. Run: ``python -m benchmarks.predict --out docs/benchmarks.md [--videos 64]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.report import update_section
from pipeline.prepare import PrepareOptions, prepare_ssv2
from pipeline.synthetic import PRESETS, SynthConfig, generate
from shard_tools.build import BuildOptions, build_dataset
from tstl.core.config import dump_yaml, load_cli_config
from tstl.core.log import init_logging
from tstl.data import build_eval_loader
from tstl.models import create_model
from tstl.predict import Predictor
from tstl.train.config import TrainConfig
from tstl.train.evaluate import evaluate

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [str(ROOT / "configs/data/ssv2.yaml"), str(ROOT / "configs/demo.yaml")]


def make_data(root: Path, num_videos: int) -> Path:
    """A demo-style SSV2 release of about ``num_videos`` validation videos, prepared and sharded."""
    val_fraction = SynthConfig().split_fractions[1]
    per_class = max(3, round(num_videos / 8 / val_fraction))
    cfg = SynthConfig(**{**PRESETS["demo"], "videos_per_class": per_class, "broken_ssv2": 0,
                         "seed": 3})
    generate(cfg, root / "raw", datasets=("ssv2",), jobs=2)
    prepare_ssv2(root / "raw/ssv2", PrepareOptions(data_dir=root, jobs=2))
    build_dataset(root, "ssv2", 1, BuildOptions(jobs=2))
    return root


def make_run(root: Path, data_dir: Path) -> Path:
    """A checkpoint of the demo model (random weights) and its config; returns the checkpoint."""
    cfg = load_cli_config(TrainConfig, CONFIGS, [f"data_dir={data_dir}", f"out_dir={root}"])
    torch.manual_seed(0)
    model = create_model(cfg.model.name, num_classes=8)
    root.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, root / "model.pt")
    dump_yaml(cfg, root / "config.yaml")
    return root / "model.pt"


def _fastest_interleaved(fns: list, repeats: int) -> list[float]:
    """Fastest of ``repeats`` runs of each function, taken in turns after one warm-up of each, so
    that load from elsewhere on the machine hits every path alike."""
    for fn in fns:
        fn()  # warm-up: caches, thread pools, first-touch allocations
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def run(num_videos: int, repeats: int) -> str:
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        data = make_data(Path(tmp) / "data", num_videos)
        ckpt = make_run(Path(tmp) / "run", data)
        cfg_file = ckpt.parent / "config.yaml"
        predictor = Predictor(ckpt, configs=[cfg_file], device="cpu")
        cfg = load_cli_config(TrainConfig, [cfg_file])
        model = predictor.run.scorer.model
        shards = data / "ssv2/shards/val"
        val = [line.split()[0].removesuffix(".mp4") for line in
               (data / "ssv2/annotations/val.csv").read_text().splitlines()]
        raw = [data / "raw/ssv2/20bn-something-something-v2" / f"{v}.webm" for v in val]
        n = len(val)

        def eval_loop() -> None:
            loader = build_eval_loader(cfg.data, shards)
            evaluate(model, loader, torch.device("cpu"), 8, torch.float32, cfg.test_merge,
                     "bench eval")

        def predict(inputs: list) -> None:
            preds = predictor.predict(inputs)
            assert all(p.ok for p in preds), [p.error for p in preds if not p.ok]

        load = os.getloadavg()[0]
        times = _fastest_interleaved([eval_loop, lambda: predict([shards]), lambda: predict(raw)],
                                     repeats)
        load = max(load, os.getloadavg()[0])
        names = ["`tstl eval` (shard set, evaluation loader)", "`tstl predict`, shard set",
                 "`tstl predict`, raw `.webm` files (transcoded like the prepare stage)"]
        rows = list(zip(names, times))
    nt, nc = cfg.data.test_views
    lines = [f"## `tstl predict` vs `tstl eval` (`python -m benchmarks.predict --videos "
             f"{num_videos} --repeats {repeats}`; CPU, {torch.get_num_threads()} threads)", "",
             f"{n} demo-style SSV2 validation videos (synthetic, 2-3 s, 160-240 px wide .webm; "
             f"240 p H.264 after the prepare stage), `{cfg.model.name}` ({cfg.data.num_frames} "
             f"frames at {cfg.data.input_size} px), {nt} x {nc} views per video, batches of "
             f"{cfg.data.eval_batch_size} views; eval with {cfg.data.num_workers} loader "
             f"worker(s), predict with 2 reading threads. Fastest of {repeats} rounds (paths in "
             f"turns) after a warm-up; model loading not timed. Load average {load:.1f} on "
             f"{os.cpu_count()} cores while measuring (other work on the machine: the paths "
             "compete for the cores with it, so compare rows, not runs).", "",
             "| path | seconds | videos / s | vs eval |", "|---|---|---|---|"]
    for name, t in rows:
        lines.append(f"| {name} | {t:.2f} | {n / t:.1f} | {rows[0][1] / t:.2f}x |")
    lines += ["", "Both score the same views with the same model; predict reads the shard samples "
              "in its own threads instead of loader processes, and for raw files runs one ffmpeg "
              "transcode per video (the cost of seeing what training saw; docs/training.md, "
              "\"Using a trained model\")."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    init_logging()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/benchmarks.md", help="report file (section 'predict')")
    p.add_argument("--videos", type=int, default=64, help="about this many validation videos")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed passes per path (the fastest counts)")
    args = p.parse_args(argv)
    md = run(args.videos, args.repeats)
    update_section(args.out, "predict", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
