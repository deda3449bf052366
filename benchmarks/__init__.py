"""Benchmarks of ddsnet's quality, speed and memory, each run as ``python -m benchmarks.NAME``."""
