"""The user's entry point: a typed, validated experiment spec (spec, checks), the runner that sweeps
link profiles over a backend started once, the append-only result store with its manifest, plots.

Stands on backends (one interface for all four) and, for the simulator's calibration and
validation commands, on sim; never on train.
"""
