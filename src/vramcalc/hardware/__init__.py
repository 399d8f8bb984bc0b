"""GPUs: the catalog of cards (catalog) and the GPUs of this machine through NVML (devices)."""
