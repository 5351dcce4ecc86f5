"""Sections and helpers of ``python -m bench.gpu_check`` (see bench/gpu_check.py)."""
