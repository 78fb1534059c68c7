"""The loader benchmark runs every path at a tiny size and writes one row per path, with medians and
ranges."""

from __future__ import annotations

import re

from benchmarks import loader
from tstl.data.decode import decoder_available


def test_bench_writes_every_path(tmp_path) -> None:
    out = tmp_path / "benchmarks.md"
    loader.main(["--out", str(out), "--videos", "16", "--repeat", "1", "--rounds", "2"])
    section = out.read_text().split("<!-- bench:loader -->")[1].split("<!-- /bench:loader -->")[0]
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([\d.]+) \|", section, re.M))
    tc = decoder_available("torchcodec")  # its rows only where the optional decoder loads
    for key, label in loader.PATHS.items():
        assert (label in rows) == (tc or not key.startswith("tc-")), label
        assert float(rows.get(label, 1)) > 0, label
    ratio = re.search(r"worker side \(decode, crop, uint8 out\) \| [\d.]+ \| \*\*([\d.]+)\*\* "
                      r"\(([\d.]+)-([\d.]+)\)",
                      section)
    assert ratio, "the device-side ratio is the bold figure, with the rounds' range"
