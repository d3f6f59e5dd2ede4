"""Robustness-congruent model updates: per-sample flip evaluation and RCAT fine-tuning on Ray.

A folder per thing a user does; the layers and the import rule are in docs/architecture.md.
"""
