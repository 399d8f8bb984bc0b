"""Byte units, defined once: binary, as torch's allocator and nvidia-smi count (MiB, GiB)."""

KiB = 2**10
MiB = 2**20
GiB = 2**30
