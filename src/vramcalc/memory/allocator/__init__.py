"""The simulated CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp).

replay (the pure-Python replay and the request types; `ENGINE` says which replay runs),
_replay (the same replay compiled from _replay.c, optional), constants (the CUDA context,
cuBLAS workspaces and the measured slack outside the tensors).
"""
