"""Switch a shard set's metadata and tars together: readers see the old set or the new one, never a
mix.

The path users pass (``<dataset>/shards/<split>``) is a relative symlink to a generation folder
beside it, ``.<split>.gen-<hash>``, where ``<hash>`` is taken from the set's ``shards.json`` and
manifest (so the same inputs give the same name). A build writes the new set into a fresh staging
folder ``.<split>.tmp-<pid>`` (unchanged shards are hard links into the current generation, so they
cost no space and keep their mtime), renames it to its generation name and swaps the symlink with
one atomic ``rename``; then the old generation is removed. A kill at any point leaves the symlink on
a complete set; the next build removes staging folders and stray generations.

A set built before this layout (a plain folder) is moved to a generation folder once, with a symlink
in its place; between those two renames the set is briefly absent, never mixed.

One builder per shard set at a time (``make shards`` runs them one after another).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Self

from tstl.core import shards
from tstl.core.durable import fsync_dir
from tstl.core.faults import fault_point

logger = logging.getLogger(__name__)


def _own(out: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(out.name)}\.(gen-[0-9a-f]{{16}}|tmp-\d+|link-\d+)$")


def generation_name(out: Path, shard_dir: Path) -> str:
    """``.<split>.gen-<hash>`` of the set in ``shard_dir`` (hash over its ``shards.json`` and
    manifest)."""
    h = hashlib.sha256()
    for name in (shards.INDEX, shards.MANIFEST):
        h.update((shard_dir / name).read_bytes())
    return f".{out.name}.gen-{h.hexdigest()[:16]}"


def current(out: Path) -> Path | None:
    """The folder that holds the visible set of ``out`` (None when there is none)."""
    if out.is_symlink():
        target = out.parent / os.readlink(out)
        return target if target.is_dir() else None
    return out if out.is_dir() else None


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    for child in sorted(path.iterdir()):
        child.unlink()  # a set folder holds files only
        fault_point("shards.gc.file")
    path.rmdir()


def stray(out: Path) -> list[Path]:
    """Staging folders, temporary links and generations of ``out`` that the symlink does not point
    to."""
    if not out.parent.is_dir():
        return []
    pattern, cur = _own(out), current(out)
    return sorted(p for p in out.parent.iterdir() if pattern.match(p.name) and p != cur)


class Staging:
    """A fresh folder to write the new set of ``out`` into; ``publish()`` makes it visible.

    Entering removes what killed builds left (staging folders, temporary links) and moves a
    plain-folder set to the symlink layout. Leaving without ``publish()`` (an exception) removes the
    staging folder.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.dir = out.parent / f".{out.name}.tmp-{os.getpid()}"

    def __enter__(self) -> Self:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._migrate()
        for p in stray(self.out):
            if not p.name.startswith(f".{self.out.name}.gen-"):  # generations may still be reused
                _remove(p)
        self.dir.mkdir()
        fault_point("shards.stage")
        return self

    def __exit__(self, *exc) -> None:
        if self.dir.exists():
            _remove(self.dir)

    def _migrate(self) -> None:
        out = self.out
        legacy = out.parent / f".{out.name}.gen-{'0' * 16}"
        if out.is_dir() and not out.is_symlink():
            os.replace(out, legacy)  # a set from before the symlink layout
            fault_point("shards.legacy")
        if not out.exists() and not out.is_symlink() and legacy.is_dir():
            self._switch(legacy.name)

    def sources(self) -> list[Path]:
        """Folders whose shards may be reused, the visible set last (it wins): stray complete
        generations first."""
        cur = current(self.out)
        gens = [p for p in stray(self.out) if p.name.startswith(f".{self.out.name}.gen-")
                and (p / shards.INDEX).exists()]
        return gens + ([cur] if cur is not None else [])

    def _switch(self, target: str) -> None:
        link = self.out.parent / f".{self.out.name}.link-{os.getpid()}"
        link.unlink(missing_ok=True)
        os.symlink(target, link)
        fault_point("shards.link.tmp")
        os.replace(link, self.out)  # the one atomic step readers see
        fsync_dir(self.out.parent)
        fault_point("shards.switch")

    def publish(self, rebuilt: list[str] = ()) -> bool:
        """Make the staged set the visible one; False when its metadata equals the visible set's.

        Then only the ``rebuilt`` shards (damaged copies rewritten with the bytes the metadata
        promises) are renamed over the visible ones, each atomically; everything else stays
        untouched.
        """
        name = generation_name(self.out, self.dir)
        cur = current(self.out)
        if cur is not None and cur.name == name:
            for shard in rebuilt:
                os.replace(self.dir / shard, cur / shard)
                fault_point("shards.repair")
            _remove(self.dir)
            changed = False
        else:
            final = self.out.parent / name
            if final.exists():
                _remove(final)  # a stray generation with the same content: ours replaces it
            fsync_dir(self.dir)
            os.replace(self.dir, final)
            fault_point("shards.generation")
            self._switch(name)
            changed = True
        for p in stray(self.out):
            _remove(p)
            fault_point("shards.gc")
        return changed


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (same file system), copying where links are not supported."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
