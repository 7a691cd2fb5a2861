"""Benchmarks: decode latency and memory side by side (latency.py), profiling (profile.py), plots."""
