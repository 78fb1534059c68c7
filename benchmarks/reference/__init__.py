"""Literal restatements of the reference implementations' forward passes (CAST, TimeSformer), used
by the parity tests and by the benchmarks as the baseline. Test and benchmark support only; no
library code imports them."""
