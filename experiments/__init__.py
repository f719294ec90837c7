"""Experiments run with the pack's own trainer (toy scale)."""
