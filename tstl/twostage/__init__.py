"""TSTL two-stage learning: class groups, stage plans, routed selector + group experts,
stage files."""
