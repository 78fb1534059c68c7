"""Benchmark: one TimeSformer training step (forward + cross-entropy + backward), this
implementation vs the reference formulation (``reference_timesformer``), same weights, same clip, in
one run.

Writes the "timesformer" section of docs/benchmarks.md. Defaults are the issue's setting (divided
attention, 8x224, batch 2, CPU, float32); ``--frames/--img-size/--depth`` shrink it for a quick run.
On CUDA the step runs under bf16 autocast and the section also gives peak memory and model FLOP
utilisation (``--peak-tflops``).

    python -m benchmarks.timesformer --out docs/benchmarks.md
    python -m benchmarks.timesformer --out /tmp/b.md --frames 4 --img-size 64 --depth 2   # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks.reference.timesformer import reference_forward
from benchmarks.report import update_section
from tstl.core.log import init_logging
from tstl.models import create_model
from tstl.models.timesformer import TimeSformer

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """Timing of one implementation's training step."""

    name: str
    seconds: list[float]
    peak_mib: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(forward: Callable[[torch.Tensor], torch.Tensor], model: TimeSformer, x: torch.Tensor,
          y: torch.Tensor) -> float:
    """Seconds of one forward + cross-entropy + backward (bf16 autocast on CUDA)."""
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if x.device.type == "cuda"
                else contextlib.nullcontext())
    model.zero_grad(set_to_none=True)
    _sync(x.device)
    start = time.perf_counter()
    with autocast:
        loss = F.cross_entropy(forward(x).float(), y)
    loss.backward()
    _sync(x.device)
    return time.perf_counter() - start


def time_steps(impls: dict[str, Callable[[torch.Tensor], torch.Tensor]], model: TimeSformer,
               x: torch.Tensor, y: torch.Tensor, repeats: int) -> list[StepResult]:
    """Time ``repeats`` steps of each implementation after one warm-up step each.

    The implementations alternate step by step, so load from other processes on a shared machine
    hits both alike.
    """
    results = {name: StepResult(name, []) for name in impls}
    for name, forward in impls.items():  # warm-up: allocators, kernels, peak memory
        if x.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(x.device)
        logger.info("%s warm-up step: %.3f s", name, _step(forward, model, x, y))
        if x.device.type == "cuda":
            results[name].peak_mib = torch.cuda.max_memory_allocated(x.device) / 2**20
    for i in range(repeats):
        for name, forward in impls.items():
            results[name].seconds.append(_step(forward, model, x, y))
            logger.info("%s step %d: %.3f s", name, i, results[name].seconds[-1])
    return list(results.values())


def step_flops(model: TimeSformer, x: torch.Tensor) -> float:
    """FLOPs of one forward+backward step (torch's FlopCounterMode: 2 per multiply-accumulate)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(x).float().sum().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def run(frames: int, img_size: int, batch: int, depth: int, repeats: int,
        device: str) -> tuple[list[StepResult], dict]:
    """Build the model once and time both implementations on the same weights and clip."""
    dev = torch.device(device)
    torch.manual_seed(0)
    # No drop path: the reference formulation has none, and both must do the same work.
    model = create_model("timesformer_vit_b16", num_frames=frames, img_size=img_size, depth=depth,
                         drop_path_rate=0.0).to(dev).train()
    x = torch.randn(batch, 3, frames, img_size, img_size, device=dev)
    y = torch.randint(0, model.num_classes, (batch,), device=dev)
    params = dict(model.named_parameters())
    heads = model.blocks[0].attn.num_heads
    results = time_steps({
        "tstl TimeSformer": model,
        "reference formulation": lambda v: reference_forward(params, v, model.attention_type,
                                                             heads),
    }, model, x, y, repeats)
    info = {"params": sum(p.numel() for p in model.parameters())}
    if dev.type == "cuda":
        info["flops"] = step_flops(model, x)
    return results, info


def render(results: list[StepResult], info: dict, args: argparse.Namespace) -> str:
    """Markdown section: settings, a table of step times and the speed-up."""
    ours, ref = results
    dev = (args.device if args.device != "cpu"
           else f"CPU ({torch.get_num_threads()} threads, {platform.machine()})")
    precision = "bf16 autocast" if args.device.startswith("cuda") else "float32"
    lines = [
        "## TimeSformer training step",
        "",
        f"Divided space-time attention, {args.frames}x{args.img_size}, batch {args.batch}, depth "
        f"{args.depth}, {info['params'] / 1e6:.2f} M parameters, {precision}, {dev}. Forward + "
        f"cross-entropy + backward, median of {args.repeats} steps after one warm-up, the two "
        "implementations alternating step by step; both implementations share the same parameters "
        "and clip (`python -m benchmarks.timesformer`).",
        "",
        "| implementation | step (s), median | fastest step (s) | clips/s |"
        + (" peak memory (MiB) | MFU |" if "flops" in info else ""),
        "|---|---|---|---|" + ("---|---|" if "flops" in info else ""),
    ]
    for r in results:
        row = f"| {r.name} | {r.median:.3f} | {min(r.seconds):.3f} | {args.batch / r.median:.2f} |"
        if "flops" in info:
            mfu = info["flops"] / r.median / (args.peak_tflops * 1e12)
            row += f" {r.peak_mib:.0f} | {100 * mfu:.1f}% |"
        lines.append(row)
    lines += ["", f"Speed-up over the reference formulation: **{ref.median / ours.median:.2f}x** "
                  f"(median), {min(ref.seconds) / min(ours.seconds):.2f}x (fastest steps)."]
    if "flops" not in info:
        lines += ["", "CPU steps are dominated by the weight matmuls that both implementations "
                      "share, and timings on a shared machine are noisy (hence the alternation). "
                      "No GPU was used for this run, so bf16 clips/s, peak memory and MFU are not "
                      "measured here (`--device cuda`)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="docs/benchmarks.md",
                        help="report to update (section 'timesformer')")
    parser.add_argument("--frames", type=int, default=8, help="clip length (size knob)")
    parser.add_argument("--img-size", type=int, default=224, help="frame size (size knob)")
    parser.add_argument("--depth", type=int, default=12, help="number of blocks (size knob)")
    parser.add_argument("--batch", type=int, default=2, help="clips per step")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed steps per implementation (alternating)")
    parser.add_argument("--device", default="cpu",
                        help="torch device; CUDA runs under bf16 autocast")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the device's dense bf16 peak for MFU (H100 SXM: 989)")
    args = parser.parse_args(argv)
    init_logging()
    results, info = run(args.frames, args.img_size, args.batch, args.depth, args.repeats,
                        args.device)
    markdown = render(results, info, args)
    update_section(args.out, "timesformer", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
