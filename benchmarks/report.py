"""Write one benchmark's section into docs/benchmarks.md without touching the others.

Each benchmark owns the text between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; a new
section is appended at the end. Several benchmarks can therefore run independently and update one
shared report.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_HEADER = ("# Benchmarks\n\nWritten by `make bench`; each section is replaced by the "
           "benchmark that owns it.\n")


def update_section(path: str | os.PathLike, name: str, markdown: str) -> None:
    """Replace (or append) the section ``name`` of the report at ``path`` with ``markdown``."""
    path = Path(path)
    text = path.read_text() if path.exists() else _HEADER
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = (pattern.sub(lambda _: block, text) if pattern.search(text)
            else text.rstrip("\n") + "\n\n" + block + "\n")
    tmp = path.with_suffix(".md.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(text)
    os.replace(tmp, path)
