"""Backends give the experiment runner N node servers and (for emulation) links it can reshape live."""
