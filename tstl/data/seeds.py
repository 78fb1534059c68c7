"""Seeds derived from tuples of integers: every random draw of the loader is keyed by what it
belongs to."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from a tuple of integers (epoch, position, ...), well mixed by NumPy's
    SeedSequence."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])

