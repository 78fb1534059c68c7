"""Parquet manifests that survive being killed: an append-only journal compacted into Parquet at the
end.

While a stage runs, each finished item is appended as one JSON line to ``<manifest>.journal`` and
flushed, so a run killed at any moment (SIGKILL included) loses at most the items in flight. The
next run reads the previous Parquet manifest *and* the journal (ignoring a torn last line), and
``compact()`` folds both into a new Parquet file written under a temporary name and renamed. Memory
stays bounded by one small record per item.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tstl.core.faults import fault_point

logger = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("key", pa.string()),            # item id: SSV2 video id, "<Class>/<name>" for UCF101, the clip
                                     # name for K400
    ("split", pa.string()),          # comma-separated annotation splits that list the item
    ("source", pa.string()),         # absolute source path
    ("source_size", pa.int64()),
    ("source_mtime_ns", pa.int64()),
    ("output", pa.string()),         # output path relative to the dataset folder
    ("output_size", pa.int64()),
    ("output_mtime_ns", pa.int64()),
    ("status", pa.string()),         # ok | failed | timeout | missing
    ("error", pa.string()),
    ("duration", pa.float64()),      # seconds, of the output
    ("frames", pa.int64()),          # video frames in the output
    ("source_frames", pa.int64()),   # frames the source header announces (AVI, MP4; empty for WebM)
    ("fps", pa.float64()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("params", pa.string()),         # JSON of the parameters that produced the output
    ("params_hash", pa.string()),
    ("ffmpeg", pa.string()),         # ffmpeg version line
    ("processed_at", pa.string()),   # UTC ISO time
])
COLUMNS = SCHEMA.names


def _normalise(row: dict) -> dict:
    return {c: row.get(c) for c in COLUMNS}


def read_rows(path: Path) -> Iterator[dict]:
    """Rows of a Parquet manifest followed by its journal (later rows win when keys repeat)."""
    if path.exists():
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=8192):
            yield from batch.to_pylist()
    journal = journal_path(path)
    if journal.exists():
        with journal.open() as f:
            for line in f:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    logger.warning("%s: ignoring a torn line (the previous run was "
                                   "killed while writing)", journal)


def journal_path(path: Path) -> Path:
    return path.with_name(path.name + ".journal")


def latest_by_key(path: Path) -> dict[str, dict]:
    """The newest row of every key in a manifest (Parquet + journal)."""
    return {row["key"]: row for row in read_rows(path)}


def repair_journal(path: Path) -> None:
    """Make a journal end on a line boundary before anything is appended to it.

    A power cut or a full disk can leave a partial last line; appending after it would glue the next
    row to it and lose that row too. A partial line that still parses is completed with its newline;
    otherwise it is cut off (its item has no record, so the stage redoes it).
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with path.open("rb+") as f:
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return
        # Find the start of the last line without reading the whole journal.
        pos, block = size, 1 << 16
        start = 0
        while pos > 0:
            pos = max(0, pos - block)
            f.seek(pos)
            chunk = f.read(min(block, size - pos))
            i = chunk.rfind(b"\n")
            if i >= 0:
                start = pos + i + 1
                break
        f.seek(start)
        tail = f.read()
        try:
            json.loads(tail)
            f.seek(size)
            f.write(b"\n")
            logger.warning("%s: completed an unterminated last line (the previous run "
                           "stopped while writing)", path)
        except ValueError:
            f.truncate(start)
            logger.warning("%s: dropped a torn last line (the previous run stopped while "
                           "writing); its item is redone", path)
        f.flush()
        os.fsync(f.fileno())


class Journal:
    """Append-only, line-buffered record of finished items."""

    def __init__(self, manifest: Path) -> None:
        self.path = journal_path(manifest)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_journal(self.path)
        self._f = self.path.open("a", buffering=1)

    def append(self, row: dict) -> None:
        fault_point("journal-append")
        # one write per line: a kill tears at most this line
        self._f.write(json.dumps(_normalise(row)) + "\n")

    def close(self) -> None:
        self._f.close()


def write_parquet(path: Path, rows: Iterable[dict], batch_size: int = 8192) -> int:
    """Write rows atomically (temp name, then rename) in bounded-memory batches. Returns the row
    count."""
    tmp = temp_name(path)
    n = 0
    try:
        with pq.ParquetWriter(tmp, SCHEMA) as writer:
            batch: list[dict] = []
            for row in rows:
                batch.append(_normalise(row))
                if len(batch) >= batch_size:
                    writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=SCHEMA))
                    n, batch = n + len(batch), []
            if batch:
                writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=SCHEMA))
                n += len(batch)
        fault_point(f"rename:{path.name}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def temp_name(path: Path) -> Path:
    """The temporary name ``path`` is written under before its rename: ``.<name>.tmp-<pid>``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def clean_temps(folder: Path, names: str) -> list[Path]:
    """Delete temp files (``.<name>.tmp-<pid>``) a killed run left in ``folder`` for outputs whose
    name fully matches the regular expression ``names``. Only call this while holding the dataset
    lock that guards those outputs, so no live writer's temp file is taken."""
    pattern = re.compile(rf"\.(?:{names})\.tmp-[0-9]+")
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if pattern.fullmatch(p.name):
                p.unlink(missing_ok=True)
                removed.append(p)
    if removed:
        logger.info("removed %d temp file(s) a stopped run left in %s", len(removed), folder)
    return removed


def compact(path: Path, keep: set[str] | None = None) -> int:
    """Fold the journal into the Parquet manifest (newest row per key, sorted by key) and drop the
    journal.

    Args:
        keep: only these keys survive (items no longer listed in the annotations are dropped).
    """
    rows = latest_by_key(path)
    n = write_parquet(path, (rows[k] for k in sorted(rows) if keep is None or k in keep))
    fault_point("compact:drop-journal")
    journal_path(path).unlink(missing_ok=True)
    return n


def merge(parts: list[Path], out: Path) -> int:
    """Merge per-part manifests (from ``--part i/n`` runs) into one; the newest row per key wins."""
    rows: dict[str, dict] = {}
    for p in parts:
        for row in read_rows(p):
            old = rows.get(row["key"])
            if old is None or (row.get("processed_at") or "") >= (old.get("processed_at") or ""):
                rows[row["key"]] = row
    return write_parquet(out, (rows[k] for k in sorted(rows)))
