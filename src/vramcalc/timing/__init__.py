"""Timing: how long a step takes and what a run costs (named so as not to shadow `time`).

step_time (FLOPs and bytes per kernel class), gpu_speed (peaks and efficiencies per GPU),
cost (seconds per step, tokens per second, wall time and price).
"""
