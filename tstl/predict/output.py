"""``tstl predict --out``: JSONL or CSV of the predictions, written as they come and resumable.

Records go to ``<out>.partial`` (JSONL, one line per video, on disk at once) while the batch runs;
the final file is written from it at the end and the partial file removed. A rerun with the same
``--out`` and settings finds the partial file of a run that was killed and predicts only the videos
it does not hold yet.

JSONL record (one per video)::

    {"source": "clips/a.webm", "key": "a", "top": [{"class": "...", "prob": 0.93}, ...],
     "views": 6, "frames": 48, "fps": 12.0, "duration": 4.0,
     "windows": [{"start": 0.0, "end": 2.0, "top": [...]}, ...]}

plus ``"label"``/``"label_class"`` for shard samples, and ``{"source", "key", "error"}`` for a
video that failed. CSV: one row per video (``scope`` ``video``) and per window (``scope``
``window``), columns ``CSV_COLUMNS`` then ``class_1, prob_1, ... class_k, prob_k``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from tstl.core.exitcodes import UsageError
from tstl.predict.predictor import Prediction

logger = logging.getLogger(__name__)

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}
CSV_COLUMNS = ("source", "key", "label", "scope", "start", "end", "error")
HEADER = "tstl-predict/v1"


def out_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"--out {path}: unknown format", "end the name with .jsonl or .csv")
    return fmt


def record(pred: Prediction, classes: Sequence[str], k: int) -> dict:
    """The JSON record of one prediction."""
    rec: dict = {"source": pred.source, "key": pred.key}
    if pred.label is not None:
        rec["label"] = pred.label
        rec["label_class"] = classes[pred.label] if 0 <= pred.label < len(classes) else None
    if not pred.ok:
        return {**rec, "error": pred.error}

    def top(probs) -> list[dict]:
        return [{"class": c, "prob": round(p, 6)} for c, p in pred.top(k, classes, probs)]

    rec.update(top=top(pred.probs), views=pred.views, frames=pred.frames, fps=pred.fps,
               duration=round(pred.duration, 6))
    if pred.windows:
        rec["windows"] = [{"start": round(w.start, 6), "end": round(w.end, 6), "top": top(w.probs)}
                          for w in pred.windows]
    return rec


def csv_rows(rec: dict, k: int) -> list[list]:
    """CSV rows of one record: the video, then its windows."""
    base = [rec["source"], rec["key"], rec.get("label", "")]

    def tops(top: list[dict]) -> list:
        cells = [x for t in top for x in (t["class"], f"{t['prob']:.6f}")]
        return cells + [""] * (2 * k - len(cells))

    if "error" in rec:
        return [base + ["video", "", "", rec["error"]] + [""] * (2 * k)]
    rows = [base + ["video", 0.0, rec["duration"], ""] + tops(rec["top"])]
    rows += [base + ["window", w["start"], w["end"], ""] + tops(w["top"])
             for w in rec.get("windows", [])]
    return rows


class Writer:
    """Writes records to ``<out>.partial`` as they come; ``close`` writes ``out`` in its format."""

    def __init__(self, out: Path, settings: dict, k: int) -> None:
        self.out, self.k, self.fmt = out, k, out_format(out)
        self.partial = out.with_name(out.name + ".partial")
        self.settings = settings
        self.records: list[dict] = self._resume()
        out.parent.mkdir(parents=True, exist_ok=True)
        if not self.records:
            self.partial.write_text(json.dumps({"format": HEADER, "settings": settings}) + "\n")

    def _resume(self) -> list[dict]:
        """The records of an interrupted run with the same settings (empty when there is none)."""
        if not self.partial.is_file():
            return []
        lines = self.partial.read_text().splitlines()
        try:
            head = json.loads(lines[0]) if lines else {}
        except ValueError:
            head = {}
        if head.get("format") != HEADER or head.get("settings") != self.settings:
            logger.warning("%s is from a run with other settings: starting over", self.partial)
            return []
        kept = 1
        by_source: dict[str, dict] = {}
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except ValueError:  # the line being written when the run was killed
                break
            by_source.pop(rec["source"], None)  # a failed video tried again: its last record counts
            by_source[rec["source"]] = rec
            kept += 1
        # rewrite without a torn last line, so appending continues cleanly
        tmp = self.partial.with_name(self.partial.name + ".tmp")
        tmp.write_text("\n".join(lines[:kept]) + "\n")
        os.replace(tmp, self.partial)
        logger.info("%s: resuming, %d videos already predicted", self.partial, len(by_source))
        return list(by_source.values())

    @property
    def done(self) -> frozenset[str]:
        """Sources already predicted successfully (failed ones are tried again)."""
        return frozenset(r["source"] for r in self.records if "error" not in r)

    def add(self, rec: dict) -> None:
        self.records = [r for r in self.records if r["source"] != rec["source"]] + [rec]
        with open(self.partial, "a") as f:  # one line per video, on disk before the next one starts
            f.write(json.dumps(rec) + "\n")

    def close(self, complete: bool = True) -> None:
        """Write the final file (``complete``) or leave the partial one for a rerun."""
        if not complete:
            return
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        if self.fmt == "jsonl":
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        else:
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                ranks = (f"{c}_{i}" for i in range(1, self.k + 1) for c in ("class", "prob"))
                w.writerow([*CSV_COLUMNS, *ranks])
                for r in self.records:
                    w.writerows(csv_rows(r, self.k))
        os.replace(tmp, self.out)
        self.partial.unlink(missing_ok=True)
