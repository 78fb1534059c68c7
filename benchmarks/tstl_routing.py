"""Routed TSTL inference cost vs a single B-CAST: forwards per view, MACs per view and CPU latency.

Builds a selector and K experts sharing one frozen trunk (random weights: cost does not depend on
them), routes a batch with hard (top-1) and soft (top-2) routing and compares with one B-CAST
forward.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from benchmarks.report import update_section
from tstl.core.log import init_logging
from tstl.models import create_model
from tstl.models.flops import flops_per_view
from tstl.twostage.groups import balanced_groups
from tstl.twostage.routing import route
from tstl.twostage.stagefile import share_frozen

logger = logging.getLogger(__name__)


def _time_interleaved(fns: list, repeats: int) -> list[float]:
    """Fastest of ``repeats`` runs of each function, taken in turns so that load from elsewhere on
    the machine hits every method alike."""
    for fn in fns:
        fn()  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def run(model: str, num_classes: int, num_groups: int, batch: int, repeats: int) -> str:
    """Measure and return the markdown section."""
    torch.manual_seed(0)
    groups = balanced_groups(num_classes, num_groups)
    single = create_model(model, num_classes=num_classes).eval()
    selector = create_model(model, num_classes=num_groups).eval()
    share_frozen(single, selector)
    experts = []
    for members in groups.groups:
        e = create_model(model, num_classes=len(members)).eval()
        share_frozen(single, e)
        experts.append(e)
    x = torch.randn(batch, 3, single.num_frames, single.img_size, single.img_size)
    # counted on the meta device: the CPU's fused attention kernels are invisible to
    # FlopCounterMode (see test_bcast)
    with torch.device("meta"):
        macs = flops_per_view(create_model(model, num_classes=num_classes))
    calls: dict[int, list[int]] = {1: [], 2: []}

    def routed(k: int):
        def step() -> None:
            calls[k][:] = route(x, selector(x), experts, groups, top_k=k).expert_calls
        return step

    with torch.inference_mode():
        t_single, t_hard, t_soft = _time_interleaved([lambda: single(x), routed(1), routed(2)],
                                                     repeats)
    rows = [("single B-CAST", 1.0, t_single),
            ("TSTL hard (top-1)", 1.0 + sum(calls[1]) / batch, t_hard),
            ("TSTL soft (top-2)", 1.0 + sum(calls[2]) / batch, t_soft)]
    lines = [f"### TSTL routed inference (`{model}`, {num_groups} experts, batch {batch}, CPU, "
             f"{torch.get_num_threads()} threads)", "",
             "| method | B-CAST forwards / view | GMACs / view | ms / batch (fastest of "
             f"{repeats}) | vs single |",
             "|---|---|---|---|---|"]
    for name, fwd, t in rows:
        lines.append(f"| {name} | {fwd:.2f} | {fwd * macs / 1e9:.1f} | {1e3 * t:.1f} | "
                     f"{t / t_single:.2f}x |")
    lines += ["", f"Experts hold only trainable weights; all {num_groups} experts plus the "
                  "selector share one frozen trunk, so running all experts is never needed "
                  "(forwards/view = 1 selector + routed experts)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m benchmarks.tstl_routing --out docs/benchmarks.md``."""
    init_logging()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="docs/benchmarks.md",
                   help="report file (section 'tstl-routing')")
    p.add_argument("--model", default="bcast_vit_b16",
                   help="bcast_vit_b16 | bcast_small_demo | bcast_test (quick)")
    p.add_argument("--num-classes", type=int, default=174, help="SSV2's classes")
    p.add_argument("--num-groups", type=int, default=15, help="TSTL's SSV2 grouping")
    p.add_argument("--batch", type=int, default=1, help="size knob: videos per batch")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per method (the fastest counts)")
    args = p.parse_args(argv)
    md = run(args.model, args.num_classes, args.num_groups, args.batch, args.repeats)
    update_section(args.out, "tstl-routing", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
