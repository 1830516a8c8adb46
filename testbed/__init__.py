"""Network-emulation testbed for multi-device Transformer inference (ASTRA and baselines)."""

__version__ = "0.1.0"
