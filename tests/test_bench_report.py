from pathlib import Path

from benchmarks.report import update_section


def test_sections_are_replaced_in_place_and_others_kept(tmp_path: Path) -> None:
    report = tmp_path / "bench.md"
    update_section(report, "a", "first A")
    update_section(report, "b", "only B")
    update_section(report, "a", "second A")
    text = report.read_text()
    assert "second A" in text and "first A" not in text and "only B" in text
    assert text.index("second A") < text.index("only B")
