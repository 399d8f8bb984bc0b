"""Sizing: does a plan fit, what is the largest that fits, what to change.

verdict (the one fit rule), search (largest batch / sequence), advice (suggestions),
comparison (compare: every method; fit: every model on one GPU).
"""
