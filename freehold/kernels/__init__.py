"""Hand-written CPU kernels (C, compiled once on first use): see native.py."""
