"""Routed TSTL inference cost vs a single B-CAST: forwards per view, MACs per view and CPU latency.

Builds a selector and K experts sharing one frozen trunk (random weights: cost does not depend on them),
routes a batch with hard (top-1) and soft (top-2) routing and compares with one B-CAST forward.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from tstl.benchreport import update_section
from tstl.log import init_logging
from tstl.models import create_model
from tstl.models.bcast import flops_per_view
from tstl.twostage.experts import share_frozen
from tstl.twostage.groups import balanced_groups
from tstl.twostage.routing import route

logger = logging.getLogger(__name__)


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


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
    macs = flops_per_view(single)
    rows = []
    with torch.inference_mode():
        t_single = _time(lambda: single(x), repeats)
        rows.append(("single B-CAST", 1.0, t_single))
        for k, name in ((1, "TSTL hard (top-1)"), (2, "TSTL soft (top-2)")):
            calls: list[int] = []

            def step() -> None:
                out = route(x, selector(x), experts, groups, top_k=k)
                calls[:] = out.expert_calls

            t = _time(step, repeats)
            rows.append((name, 1.0 + sum(calls) / batch, t))
    lines = [f"### TSTL routed inference (`{model}`, {num_groups} experts, batch {batch}, CPU, "
             f"{torch.get_num_threads()} threads)", "",
             "| method | B-CAST forwards / view | GMACs / view | ms / batch | vs single |", "|---|---|---|---|---|"]
    for name, fwd, t in rows:
        lines.append(f"| {name} | {fwd:.2f} | {fwd * macs / 1e9:.3f} | {1e3 * t:.1f} | {t / t_single:.2f}x |")
    lines += ["", f"Experts hold only trainable weights; all {num_groups} experts plus the selector share one frozen "
              "trunk, so running all experts is never needed (forwards/view = 1 selector + routed experts)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m tstl.twostage.bench --out docs/benchmarks.md``."""
    init_logging()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="docs/benchmarks.md", help="report file (section 'tstl-routing')")
    p.add_argument("--model", default="bcast_test", help="bcast_test (quick) | bcast_small_demo | bcast_vit_b16")
    p.add_argument("--num-classes", type=int, default=8)
    p.add_argument("--num-groups", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="size knob: videos per batch")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    md = run(args.model, args.num_classes, args.num_groups, args.batch, args.repeats)
    update_section(args.out, "tstl-routing", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
