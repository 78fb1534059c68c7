from benchmarks.tstl_routing import main


def test_bench_writes_section(tmp_path):
    out = tmp_path / "b.md"
    assert main(["--out", str(out), "--model", "bcast_test", "--num-classes", "8", "--num-groups",
                 "4", "--batch", "4", "--repeats", "1"]) == 0
    text = out.read_text()
    assert "<!-- bench:tstl-routing -->" in text
    assert "| TSTL hard (top-1) | 2.00 |" in text  # selector + exactly one expert per view
    assert "| TSTL soft (top-2) | 3.00 |" in text
