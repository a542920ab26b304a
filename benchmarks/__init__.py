"""Benchmarks: kernel and end-to-end. Results are committed under benchmarks/results/."""
