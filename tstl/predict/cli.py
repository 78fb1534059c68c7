"""``tstl predict`` and ``tstl export`` (also ``python -m tstl.predict.cli``): thin entry points
over ``Predictor`` and ``export``.

``predict`` labels video files, folders, text lists or shard sets with a trained run, with
``tstl eval``'s views; ``export`` writes an ONNX file of the run's classifier plus a JSON sidecar
for runtimes without this package.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tstl.core import exitcodes
from tstl.core.config import ConfigError
from tstl.core.exitcodes import UsageError

logger = logging.getLogger("tstl.predict")

PROG = "python -m tstl.predict.cli"
PREDICT_HELP = (
    "Label videos with a trained run: every video gets tstl eval's T x C test views and merge "
    "rule. Files are first transcoded like the prepare stage did for the run's dataset (--as-is: "
    "not). Videos that cannot be read are listed and skipped; exit 1 when any failed. With --out, "
    "a killed run resumes where it stopped when rerun with the same arguments.")
EXPORT_HELP = (
    "Export a run's classifier for a fixed view shape [N, 3, T, S, S] (dynamic N) with a JSON "
    "sidecar holding what a runtime needs to reproduce tstl predict: classes, mean/std, frames, "
    "input size, sampling, views, merge rule and the prepare stage's transcode. onnxruntime "
    "checks the file against PyTorch.")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run folder, DeepSpeed tag folder or "
                   "checkpoint file (as tstl eval), or a TSTL run folder (selector + experts)")
    # one value per flag (repeat it): a list option would swallow the INPUT words that follow it
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="a YAML file of the run, repeatable (default: the run's config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a dotted config override, repeatable: --set data.test_views=[1,1] "
                        "--set data.eval_batch_size=32")
    p.add_argument("--classes", type=Path, help="class names, one per line "
                   "(<dataset>/annotations/classes.txt), when the run's shard sets are not here")


def _check_predict_args(args: argparse.Namespace) -> None:
    """Argument errors, before the model loads."""
    from tstl.predict.output import out_format

    if any(v is not None and v <= 0 for v in (args.window, args.stride)):
        raise UsageError("--window and --stride must be > 0 seconds")
    if args.stride is not None and args.window is None:
        raise UsageError("--stride needs --window", "e.g. --window 4 --stride 2")
    if args.top_k < 1:
        raise UsageError("--top-k must be >= 1")
    if args.out:
        out_format(args.out)


def cmd_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tstl.predict.output import Writer, record
    from tstl.predict.predictor import Predictor, describe

    _check_predict_args(args)
    predictor = Predictor(args.checkpoint, configs=args.config, overrides=args.overrides,
                          device=args.device, routing=args.routing, soft_top_k=args.soft_top_k,
                          classes=args.classes, as_is=args.as_is, workers=args.workers)
    classes, k = predictor.classes, min(args.top_k, len(predictor.classes))
    settings = {"checkpoint": str(Path(args.checkpoint).resolve()), "views": list(predictor.views),
                "top_k": k, "window": args.window, "stride": args.stride,
                "routing": args.routing, "prepare": predictor.prepare.to_dict(),
                "overrides": args.overrides}
    writer = Writer(args.out, settings, k) if args.out else None
    failed: list[tuple[str, str]] = []
    ok, complete = 0, False
    try:
        for pred in predictor.iter_predict(args.inputs, window=args.window, stride=args.stride,
                                           progress=True,
                                           skip=writer.done if writer else frozenset()):
            if writer:
                writer.add(record(pred, classes, k))
            if pred.ok:
                ok += 1
            else:
                failed.append((pred.source, pred.error))
            if not args.quiet:
                for line in describe(pred, classes, k):
                    tqdm.write(line)  # stdout, above the progress bar (stderr)
        complete = True
    finally:
        if writer:
            writer.close(complete)
    if writer and writer.records:
        done = sum("error" not in r for r in writer.records)
        print(f"{done} videos predicted ({done - ok} of them by an earlier run) -> {args.out}",
              file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {ok + len(failed)} videos failed:", file=sys.stderr)
        for source, why in failed:
            print(f"  {source}: {why}", file=sys.stderr)
        return exitcodes.FAILED
    return exitcodes.OK


def cmd_export(args: argparse.Namespace) -> int:
    from tstl.predict.export import ExportError, export

    try:
        paths = export(args.checkpoint, args.out, fmt=args.format, configs=args.config,
                       overrides=args.overrides, classes=args.classes, opset=args.opset,
                       check=not args.no_check)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return exitcodes.FAILED
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
    return exitcodes.OK


def _predict_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("predict", help="top-k classes of any video with a trained run (tstl "
                       "eval's views)", description=PREDICT_HELP, epilog=exitcodes.EPILOG)
    d.add_argument("inputs", nargs="+", metavar="INPUT", help="video files (any container ffmpeg "
                   "reads), folders (searched recursively), text lists (.txt: one path per line) "
                   "or shard sets (a folder with shards.json)")
    _run_args(d)
    d.add_argument("--out", type=Path, help="also write the predictions to this .jsonl or .csv")
    d.add_argument("--top-k", type=int, default=5, help="classes shown per video and window "
                   "(default 5)")
    d.add_argument("--window", type=float, help="also predict every window of this many seconds")
    d.add_argument("--stride", type=float, help="seconds between window starts (default: window)")
    d.add_argument("--routing", choices=("hard", "soft"), default="hard", help="TSTL runs: the "
                   "top group's expert (hard, TSTL's rule) or the top --soft-top-k groups' "
                   "experts weighted by the selector (soft)")
    d.add_argument("--soft-top-k", type=int, default=2, help="groups of soft routing (default 2)")
    d.add_argument("--as-is", action="store_true", help="decode files as they are (already "
                   "prepared mp4s) instead of transcoding them like the prepare stage")
    d.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, "
                   "cuda:N")
    d.add_argument("--workers", type=int, default=2, help="threads reading and decoding videos "
                   "ahead of the model (default 2)")
    d.add_argument("--quiet", action="store_true", help="no per-video lines (failures and the "
                   "summary only)")
    d.set_defaults(fn=cmd_predict)


def _export_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("export", help="ONNX file of a run's classifier + JSON sidecar (classes, "
                       "mean/std, views)", description=EXPORT_HELP, epilog=exitcodes.EPILOG)
    _run_args(e)
    e.add_argument("--format", choices=("onnx",), default="onnx", help="output format (onnx)")
    e.add_argument("--out", type=Path, required=True, help="the .onnx file to write (the sidecar "
                   "goes beside it, <name>.json)")
    e.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    e.add_argument("--no-check", action="store_true", help="skip the onnxruntime vs PyTorch "
                   "comparison")
    e.set_defaults(fn=cmd_export)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].replace("``", "'"),
                                epilog=exitcodes.EPILOG)
    sub = p.add_subparsers(dest="command", required=True, metavar="{predict,export}")
    _predict_parser(sub)
    _export_parser(sub)
    return p


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    from pipeline.errors import EnvironmentFault
    from tstl.core.log import init_logging

    args = build_parser(prog).parse_args(argv)
    init_logging()
    try:
        return args.fn(args)
    except (ConfigError, UsageError) as e:
        return exitcodes.usage_error(e)
    except EnvironmentFault as e:
        print(f"error: {e}", file=sys.stderr)
        return exitcodes.ENVIRONMENT


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
