"""Inference methods: each turns a model into the work of one rank (see ASTRA.md)."""
