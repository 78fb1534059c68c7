"""B-CAST training-step benchmark: our model against the reference formulation, same weights, one
run.

A step is forward + backward of a cross-entropy loss on ``batch`` clips with gradients for the
trainable parameters only (the experts are frozen on both sides). Writes the "bcast" section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.reference.bcast import reference_forward
from benchmarks.report import update_section
from tstl.models import create_model

logger = logging.getLogger(__name__)


def _time_interleaved(a, b, steps: int) -> tuple[float, float]:
    """Mean seconds per call of ``a`` and ``b``, alternating so that background load hits both
    alike."""
    a(), b()  # warm-up (allocator, kernels)
    ta = tb = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        a()
        ta += time.perf_counter() - start
        start = time.perf_counter()
        b()
        tb += time.perf_counter() - start
    return ta / steps, tb / steps


def run(model_name: str, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=174)
    cfg = {"depth": len(model.blocks), "num_heads": model.blocks[0].attn.num_heads,
           "patch_size": model.clip_conv1.kernel_size[0]}
    x = torch.randn(batch, 3, model.num_frames, model.img_size, model.img_size)
    y = torch.randint(0, 174, (batch,))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    sd = {k: v.detach().clone().requires_grad_(k in trainable)
          for k, v in model.state_dict().items()}

    def ours() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def reference() -> None:
        for v in sd.values():
            v.grad = None
        F.cross_entropy(reference_forward(sd, x, **cfg), y).backward()

    with torch.no_grad():
        diff = (model(x) - reference_forward(sd, x, **cfg)).abs().max().item()
    t_ours, t_ref = _time_interleaved(ours, reference, steps)
    return {"model": model_name, "batch": batch, "frames": model.num_frames, "size": model.img_size,
            "steps": steps, "ours_s": t_ours, "reference_s": t_ref, "max_abs_diff": diff,
            "threads": torch.get_num_threads()}


def markdown(r: dict) -> str:
    cpu = f"CPU ({platform.machine()}, {os.cpu_count()} cores, {r['threads']} torch threads)"
    ref_rate = r["batch"] / r["reference_s"]
    return f"""## B-CAST training step (`python -m benchmarks.bcast`)

`{r['model']}`, batch {r['batch']} x {r['frames']} x {r['size']}^2, forward + backward (trainable
parameters only), {cpu}, float32, mean of {r['steps']} steps each, the two implementations
alternating, after a warm-up.

| implementation | s / step | clips / s |
|---|---|---|
| reference formulation (sequence-first CLIP, unfused attention) | {r['reference_s']:.2f} | \
{ref_rate:.3f} |
| `tstl.models.bcast` (batch-first, SDPA) | {r['ours_s']:.2f} | {r['batch'] / r['ours_s']:.3f} |

Speed-up: **{r['reference_s'] / r['ours_s']:.2f}x**; max |logit difference| on the same
weights {r['max_abs_diff']:.1e}. No GPU was available for this run, so bf16 clips/s, peak memory
and MFU on a GPU are not measured here.
"""


def main(argv: list[str] | None = None) -> None:
    from tstl.core.log import init_logging

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                prog="python -m benchmarks.bcast")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    p.add_argument("--model", default="bcast_vit_b16",
                   help="registered B-CAST variant (bcast_test for a quick run)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args(argv)
    init_logging()
    result = run(args.model, args.batch, args.steps)
    logger.info("bcast: %s", result)
    update_section(args.out, "bcast", markdown(result))


if __name__ == "__main__":
    main()
