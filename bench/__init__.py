"""Benchmarks: `interactive bench` and the scripts whose results fill bench/RESULTS.md."""
