"""Benchmarks run by ``make bench``; each writes its own section of docs/benchmarks.md (``benchmarks.report``).

Not part of the installed packages: they import the library, never the other way round.
"""
