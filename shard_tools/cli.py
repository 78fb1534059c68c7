"""``tstl shards {build,index,verify,ls,inspect,stats,subset}`` (also
``python -m shard_tools.cli ...``): build and look after WebDataset shard sets."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from shard_tools.build import AnnotationError, BuildOptions, build_dataset
from shard_tools.index import index_in_place, index_to
from shard_tools.stats import report
from shard_tools.subset import read_group_map, subset
from shard_tools.tario import iter_samples
from shard_tools.verify import verify
from tstl.core import exitcodes, shards
from tstl.core.datasets import DATASETS
from tstl.core.exitcodes import UsageError
from tstl.core.lock import LockedError, dataset_lock
from tstl.core.shards import JSON

logger = logging.getLogger("shard_tools")

PROG = "python -m shard_tools.cli"


def _shard_set(path: Path) -> Path:
    """A shard-set folder argument that exists (exit 2 naming the folder and the fix otherwise)."""
    if not path.is_dir():
        raise UsageError(f"shard set folder not found: {path}",
                         "give a folder that `tstl shards build` wrote, e.g. "
                         "data/ucf101/shards/train_split1")
    return path


def cmd_build(a: argparse.Namespace) -> int:
    if a.annotations is None and a.dataset not in DATASETS:
        raise UsageError(f"--dataset {a.dataset}: not a registered dataset",
                         f"registered: {', '.join(DATASETS)}; any other folder needs "
                         "--annotations CSV ...")
    opts = BuildOptions(seed=a.seed, max_samples=a.max_samples, max_bytes=int(a.max_mb * 2**20),
                        jobs=a.jobs, verify_existing=not a.quick)
    # one writer per dataset folder: prepare stages and shard builds take the same lock
    with dataset_lock(a.data_dir / a.dataset, "shards build", wait=a.wait_lock):
        build_dataset(a.data_dir, a.dataset, a.split, opts, annotations=a.annotations,
                      videos=a.videos)
    return 0


def cmd_index(a: argparse.Namespace) -> int:
    local = "://" not in a.set and not a.set.startswith("pipe:")
    if a.out is not None:
        ss = index_to(a.set, a.out)
        print(f"indexed {ss.num_samples} samples of {len(ss.shards)} shards into {a.out}: publish "
              f"{a.out / shards.SAMPLES} and {a.out / shards.INDEX} beside the set's shards "
              f"(replacing its {shards.INDEX}) so that loaders read them")
        return 0
    if not local:
        raise UsageError(f"{a.set}: a remote set cannot be indexed in place",
                         "add --out DIR, then publish DIR/samples.parquet and "
                         "DIR/shards.json beside the set")
    path = _shard_set(Path(a.set))
    lock_dir = path.parent.parent if path.parent.name == "shards" else path.parent
    with dataset_lock(lock_dir, "shards index", wait=a.wait_lock):
        ss, done = index_in_place(path)
    print(f"{path}: {'indexed' if done else 'already indexed'}: {ss.num_samples} samples in "
          f"{len(ss.shards)} shards")
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    bad = 0
    for d in a.shard_dirs:
        _shard_set(d)
        reports = verify(d, decode=not a.no_decode, jobs=a.jobs)
        samples = sum(r.samples for r in reports)
        errors = [(r.name, e) for r in reports for e in r.errors]
        for name, err in errors:
            print(f"FAIL {d}/{name}: {err}")
        print(f"{'OK  ' if not errors else 'FAIL'} {d}: {len(reports)} shards, {samples} samples, "
              f"{len(errors)} problems")
        bad += bool(errors)
    return 1 if bad else 0


def cmd_ls(a: argparse.Namespace) -> int:
    ss = shards.load(_shard_set(a.shard_dir))
    print(f"{ss.dataset}/{ss.split}: {ss.num_samples} samples, {len(ss.shards)} shards, "
          f"{len(ss.classes)} classes")
    for s in ss.shards:
        print(f"{s.name}  {s.samples:6d} samples  {s.bytes / 2**20:9.2f} MiB  {s.sha256[:16]}  "
              f"{len(s.class_hist)} classes")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    if not a.path.exists():
        raise UsageError(f"not found: {a.path}", "give a shard .tar or a shard set folder")
    paths = sorted(a.path.glob("shard-*.tar")) if a.path.is_dir() else [a.path]
    shown = 0
    for p in paths:
        for key, parts in iter_samples(p):
            if a.key and key != a.key:
                continue
            meta = json.loads(parts.get(JSON, b"{}"))
            sizes = {ext: len(b) for ext, b in parts.items()}
            print(f"{p.name} {key} {json.dumps(meta, sort_keys=True)} parts={sizes}")
            shown += 1
            if a.n and shown >= a.n:
                return 0
    if a.key and not shown:
        print(f"no sample with key '{a.key}' in {a.path}", file=sys.stderr)
        return 1
    return 0


def cmd_stats(a: argparse.Namespace) -> int:
    # never into the shard set: it is checksummed, may be shared read-only, and is not ours to add
    # files to
    # named after the folder given (not the generation folder its link points at)
    png = a.png or Path.cwd() / f"{Path(os.path.abspath(a.shard_dir)).name}-stats.png"
    _shard_set(a.shard_dir)
    print(report(a.shard_dir, png))
    print(f"plot: {png}")
    return 0


def parse_classes(text: str) -> list[int]:
    """``--classes 1,4,7`` -> [1, 4, 7]; a usage error names the item that is not a class id."""
    out = []
    for i, item in enumerate(text.split(","), 1):
        try:
            out.append(int(item.strip()))
        except ValueError:
            raise UsageError(f"--classes {text}: item {i} ('{item.strip()}') is "
                             "not an integer class id",
                             "give comma-separated integers, e.g. --classes 0,3,7") from None
        if out[-1] < 0:
            raise UsageError(f"--classes {text}: item {i} ({out[-1]}) is negative",
                             "class ids start at 0")
    return out


def cmd_subset(a: argparse.Namespace) -> int:
    if a.classes:
        classes = parse_classes(a.classes)
    else:
        groups = read_group_map(a.groups)
        if not 0 <= a.group < len(groups):
            raise UsageError(
                f"{a.groups}: group {a.group} does not exist (there are {len(groups)})",
                f"--group 0..{len(groups) - 1}")
        classes = groups[a.group]
    _shard_set(a.src)
    subset(a.src, a.out, classes, remap=a.remap, head=a.head,
           opts=BuildOptions(max_samples=a.max_samples))
    return 0


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=" ".join(__doc__.split(":", 1)[1].split()),
                                epilog=exitcodes.EPILOG)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="shard a prepared dataset (one shard set per split)",
                       epilog=exitcodes.EPILOG)
    b.add_argument("--dataset", required=True,
                   help="folder name under --data-dir: a registered dataset "
                        f"({', '.join(DATASETS)}), or any folder with --annotations")
    b.add_argument("--data-dir", type=Path, required=True, help="the DATA_DIR of the prepare stage")
    b.add_argument("--split", type=int, default=1,
                   help="which official split's CSVs to shard, for datasets with several "
                        "(UCF101: 1-3; default 1); " +
                   "; ".join(f"{n}: {', '.join(d.shard_splits(1))}" for n, d in DATASETS.items())
                   + " for split 1")
    b.add_argument("--annotations", type=Path, nargs="+",
                   help="shard these CSVs instead (e.g. CAST's train.csv)")
    b.add_argument("--videos", type=Path,
                   help="folder the CSV paths are relative to (default <dataset>/videos)")
    b.add_argument("--seed", type=int, default=0,
                   help="shuffle seed of training splits (default 0)")
    b.add_argument("--max-samples", type=int,
                   help="videos per shard (default: clamp(ceil(N/128), 8, 256))")
    b.add_argument("--max-mb", type=float, default=256, help="MiB per shard at most (default 256)")
    b.add_argument("--jobs", type=int, default=os.cpu_count(),
                   help="parallel processes (default: all cores)")
    b.add_argument("--quick", action="store_true",
                   help="trust existing shards of the right size (skip sha256)")
    b.add_argument("--wait-lock", action="store_true",
                   help="wait for another run on this dataset folder to finish instead "
                        "of exiting with code 4")
    b.set_defaults(fn=cmd_build)
    ix = sub.add_parser("index",
                        help="add the per-sample index (samples.parquet) to a set built before it",
                        epilog=exitcodes.EPILOG)
    ix.add_argument("set", help="a shard set folder, or (with --out) the URL or pipe: command of "
                                "its shards.json folder")
    ix.add_argument("--out", type=Path,
                    help="write samples.parquet and the updated shards.json here instead of "
                                             "into the set (remote or read-only sets)")
    ix.add_argument("--wait-lock", action="store_true",
                    help="wait for another run on this dataset folder")
    ix.set_defaults(fn=cmd_index)
    v = sub.add_parser("verify", help="checksums, tar integrity, sample parts and video decoding")
    v.add_argument("shard_dirs", type=Path, nargs="+")
    v.add_argument("--no-decode", action="store_true", help="skip decoding the videos")
    v.add_argument("--jobs", type=int, default=os.cpu_count())
    v.set_defaults(fn=cmd_verify)
    ls = sub.add_parser("ls", help="list the shards of a set")
    ls.add_argument("shard_dir", type=Path)
    ls.set_defaults(fn=cmd_ls)
    i = sub.add_parser("inspect", help="print the samples (metadata) of a shard or shard set")
    i.add_argument("path", type=Path, help="a shard .tar or a shard set folder")
    i.add_argument("--key", help="only this sample key")
    i.add_argument("-n", type=int, default=20,
                   help="at most this many samples (0: all; default 20)")
    i.set_defaults(fn=cmd_inspect)
    s = sub.add_parser("stats", help="class balance (per head), durations, frames and sizes, "
                                     "with a PNG plot")
    s.add_argument("shard_dir", type=Path)
    s.add_argument("--png", type=Path,
                   help="plot path (default ./<shard set name>-stats.png in the current folder)")
    s.set_defaults(fn=cmd_stats)
    sb = sub.add_parser("subset",
                        help="new shard set with only some classes (bytes copied, no re-encode)")
    sb.add_argument("src", type=Path)
    sb.add_argument("out", type=Path)
    g = sb.add_mutually_exclusive_group(required=True)
    g.add_argument("--classes", help="comma-separated class ids")
    g.add_argument("--groups", type=Path,
                   help="class-group file (TSTL class_grouping.json or ours, see docs/tstl.md)")
    sb.add_argument("--group", type=int, default=0, help="which group of --groups (default 0)")
    sb.add_argument("--remap", action="store_true", help="relabel to group-local ids 0..k-1")
    sb.add_argument("--head", help="multi-head sets (EK100): the head whose classes --classes "
                                   "names (default: the first, verb)")
    sb.add_argument("--max-samples", type=int, help="videos per shard")
    sb.set_defaults(fn=cmd_subset)
    return p


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    from tstl.core.log import init_logging

    args = build_parser(prog).parse_args(argv)
    init_logging()
    try:
        return args.fn(args)
    except LockedError as e:
        logger.error("%s", e)
        return exitcodes.LOCKED
    except (AnnotationError, FileNotFoundError, ValueError, UsageError, OSError) as e:
        return exitcodes.usage_error(e)


def run() -> None:
    """Console-script entry point (``shard-tools``, an alias of ``tstl shards``)."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
