"""Parallel, resumable execution of one stage over many items.

A stage is a function ``work(item) -> dict`` that turns one source file into one output file
(written under a temporary name and renamed by the work function itself), or a ``Batched`` pair that
plans the items into batches and turns each batch into its outputs in one go (EPIC-KITCHENS: the
clips of one long video, decoded once). The runner decides what needs doing from the manifest, runs
the work on a thread pool (the heavy lifting happens in ffmpeg subprocesses, so threads suffice and
avoid pickling), journals every result as soon as it is known, and compacts the manifest at the
end.

An item is skipped when its manifest row says it was produced from a source of the same size and
mtime, with the same parameters, and the output still has the recorded size and mtime. Nothing is
probed or decoded for a skipped item, so a rerun with nothing to do costs two ``stat`` calls per
item.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from pipeline import manifest as mf
from pipeline.errors import EnvironmentFault, is_environment_error

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One unit of work: a source file and where its output goes."""

    key: str
    source: Path
    output: Path
    output_rel: str
    split: str = ""
    segment: tuple[float, float] | None = None  # cut [start, end) seconds of an untrimmed source


@dataclass(frozen=True)
class Batched:
    """Work done on several items at once: ``plan`` splits the items to do into batches, ``work``
    turns a batch into one result dict per item (in order). An exception fails the whole batch."""

    plan: Callable[[list[Item]], list[list[Item]]]
    work: Callable[[list[Item]], list[dict]]


Work = Callable[[Item], dict] | Batched


@dataclass
class Summary:
    """What a run did; ``failures`` lists (key, status, error) for every item that is not ok."""

    total: int = 0
    done: int = 0
    skipped: int = 0
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed_fraction(self) -> float:
        return len(self.failures) / self.total if self.total else 0.0

    @property
    def missing(self) -> int:
        """Items whose source file does not exist (status ``missing``)."""
        return sum(status == "missing" for _, status, _ in self.failures)

    @property
    def broken(self) -> int:
        """Items that exist but did not transcode (failed, timeout)."""
        return len(self.failures) - self.missing

    def log(self, desc: str) -> None:
        kinds = Counter(status for _, status, _ in self.failures)
        logger.info("%s: %d items, %d processed, %d already done, %d not ok %s (%d missing source, "
                    "%d broken) in %.1f s",
                    desc, self.total, self.done, self.skipped, len(self.failures),
                    dict(kinds) if kinds else "", self.missing, self.broken, self.seconds)
        for key, status, error in self.failures[:20]:
            logger.warning("  %s: %s: %s", key, status, error)
        if len(self.failures) > 20:
            logger.warning("  ... and %d more (see the manifest)", len(self.failures) - 20)


def params_hash(params: dict) -> str:
    return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def parse_part(part: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 1 <= i <= n."""
    try:
        i, n = (int(x) for x in part.split("/"))
    except ValueError:
        raise ValueError(f"--part must look like i/n (e.g. 3/8), got '{part}'") from None
    if not 1 <= i <= n:
        raise ValueError(f"--part {part}: need 1 <= i <= n")
    return i, n


def in_part(key: str, part: tuple[int, int]) -> bool:
    """Stable assignment of keys to parts: adding or removing items never moves the others."""
    i, n = part
    return n == 1 or int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % n == i - 1


def _is_current(item: Item, prev: dict | None, src: os.stat_result, phash: str,
                retry_failed: bool) -> bool:
    if prev is None or prev.get("params_hash") != phash:
        return False
    if prev.get("source_size") != src.st_size or prev.get("source_mtime_ns") != src.st_mtime_ns:
        return False
    if prev.get("status") != "ok":
        # a known-bad source stays failed until it changes or --retry-failed
        return not retry_failed
    try:
        out = item.output.stat()
    except FileNotFoundError:
        return False
    return prev.get("output_size") == out.st_size and prev.get("output_mtime_ns") == out.st_mtime_ns


def _row(item: Item, src: os.stat_result | None, params: dict, phash: str, result: dict) -> dict:
    row = {
        "key": item.key, "split": item.split, "source": str(item.source), "output": item.output_rel,
        "source_size": src.st_size if src else None,
        "source_mtime_ns": src.st_mtime_ns if src else None,
        "params": json.dumps(params, sort_keys=True), "params_hash": phash,
        "processed_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
    }
    row.update(result)
    if row.get("status") == "ok":
        out = item.output.stat()
        row["output_size"], row["output_mtime_ns"] = out.st_size, out.st_mtime_ns
    return row


def _safe(work: Work, batch: list[Item]) -> list[dict]:
    try:
        results = work.work(batch) if isinstance(work, Batched) else [work(batch[0])]
        if len(results) != len(batch):
            raise RuntimeError(f"{len(results)} results for {len(batch)} items")
        return results
    except EnvironmentFault:
        raise
    except Exception as e:
        # one bad item must never stop the stage; a full disk or read-only folder must
        if is_environment_error(e):
            raise EnvironmentFault(f"{batch[0].output}: {e}") from e
        logger.debug("%s failed", ", ".join(i.key for i in batch), exc_info=True)
        return [{"status": "failed", "error": f"{type(e).__name__}: {e}"}] * len(batch)


def run_stage(items: Iterable[Item], work: Work, manifest_path: Path, params: dict, *,
              jobs: int, desc: str, retry_failed: bool = False) -> Summary:
    """Run ``work`` on every item whose output is missing, stale or broken; record everything in the
    manifest."""
    start = time.monotonic()
    phash = params_hash(params)
    previous = mf.latest_by_key(manifest_path)
    journal = mf.Journal(manifest_path)
    summary, todo, keys = Summary(), [], set()
    try:
        for item in items:
            summary.total += 1
            keys.add(item.key)
            prev = previous.get(item.key)
            try:
                src = item.source.stat()
            except FileNotFoundError:
                gone = {"status": "missing", "error": f"source file not found: {item.source}"}
                row = _row(item, None, params, phash, gone)
                journal.append(row)
                summary.failures.append((item.key, "missing", f"{item.source} not found"))
                continue
            if _is_current(item, prev, src, phash, retry_failed):
                summary.skipped += 1
                if prev.get("status") != "ok":
                    summary.failures.append((item.key, prev["status"], prev.get("error") or ""))
                continue
            todo.append((item, src))
        stat = {item.key: src for item, src in todo}
        items_todo = [i for i, _ in todo]
        plan = work.plan(items_todo) if isinstance(work, Batched) else [[i] for i in items_todo]
        batches = [[(i, stat[i.key]) for i in batch] for batch in plan]
        _run_pool(batches, work, journal, params, phash, jobs, desc, summary)
    finally:
        journal.close()
    mf.compact(manifest_path, keep=keys)
    summary.seconds = time.monotonic() - start
    return summary


def _run_pool(batches: list[list[tuple[Item, os.stat_result]]], work: Work, journal: mf.Journal,
              params: dict, phash: str, jobs: int, desc: str, summary: Summary) -> None:
    """Thread pool with a bounded number of batches in flight (memory stays flat for 200k+ items).

    An environment error stops the stage: nothing new starts, the batches in flight finish (items
    that succeed are journalled, those hit by the same error are not recorded at all, so a rerun
    after the fix redoes them), and the first such error is raised."""
    pending: dict[Future, list[tuple[Item, os.stat_result]]] = {}
    queue = iter(batches)
    fault: EnvironmentFault | None = None
    total = sum(len(b) for b in batches)
    unit = "clip" if isinstance(work, Batched) else "video"
    with ThreadPoolExecutor(max_workers=jobs) as pool, tqdm(total=total, desc=desc, unit=unit,
                                                             disable=not total) as bar:
        while True:
            while fault is None and len(pending) < 2 * jobs:
                nxt = next(queue, None)
                if nxt is None:
                    break
                pending[pool.submit(_safe, work, [item for item, _ in nxt])] = nxt
            if not pending:
                break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                batch = pending.pop(fut)
                try:
                    results = fut.result()
                except EnvironmentFault as e:
                    fault = fault or e
                    continue
                for (item, src), result in zip(batch, results):
                    row = _row(item, src, params, phash, result)
                    journal.append(row)
                    summary.done += 1
                    if row["status"] != "ok":
                        summary.failures.append((item.key, row["status"], row.get("error") or ""))
                bar.update(len(batch))
    if fault is not None:
        raise fault

