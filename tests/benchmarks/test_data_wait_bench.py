"""The data-wait benchmark trains through the real trainer at a tiny size and writes only its own
section."""

from __future__ import annotations

import re

from benchmarks import data_wait


def test_bench_writes_its_section(tmp_path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n<!-- bench:other -->\nkeep me\n<!-- /bench:other -->\n")
    data_wait.main(["--out", str(out), "--videos", "8"])
    text = out.read_text()
    assert "keep me" in text
    section = text.split("<!-- bench:data-wait -->")[1].split("<!-- /bench:data-wait -->")[0]
    rows = re.findall(r"^\| (\d) \| (\d+)% \| ([\d.]+) \| (\d+) \|$", section, re.M)
    # one row per worker count, from the trainer's own metrics
    assert [r[0] for r in rows] == ["1", "2"]
    assert all(0 <= int(r[1]) <= 100 and float(r[2]) > 0 for r in rows)
