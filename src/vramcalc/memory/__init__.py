"""Memory: the one estimator and what it runs on.

estimate (a training step), inference (generate / merge), multi_gpu (per GPU of a parallel
plan), result (the typed Estimate every one returns), effective (what the stack really
runs for a requested plan); program/ generates the allocation requests of a step, and
allocator/ replays them on the simulated CUDA caching allocator.
"""
