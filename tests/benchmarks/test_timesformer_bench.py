"""The TimeSformer benchmark runs at a tiny size and writes only its own section of the report."""

from __future__ import annotations

from benchmarks import timesformer as bench_timesformer


def test_bench_writes_its_section(tmp_path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n<!-- bench:other -->\nkeep me\n<!-- /bench:other -->\n")
    bench_timesformer.main(["--out", str(out), "--frames", "2", "--img-size", "32", "--depth", "1",
                            "--repeats", "1"])
    text = out.read_text()
    assert "keep me" in text
    section = text.split("<!-- bench:timesformer -->")[1].split("<!-- /bench:timesformer -->")[0]
    assert "2x32, batch 2, depth 1" in section
    assert "| tstl TimeSformer |" in section and "| reference formulation |" in section
    assert "Speed-up over the reference formulation" in section
