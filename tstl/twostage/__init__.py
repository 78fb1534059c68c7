"""TSTL two-stage learning: class groups, routed selector + group experts, expert storage."""
