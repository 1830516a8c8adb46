"""Benchmark scripts: timings measured side by side in one run, printed as ratios (never asserted in tests)."""
