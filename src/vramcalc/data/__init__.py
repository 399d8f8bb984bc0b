"""Data shipped in the wheel (GPU catalog, fitted corrections), read via importlib.resources."""
