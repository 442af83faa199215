"""Benchmarks: `interactive bench` (bench/harness.py); its recorded results: bench/RESULTS.md."""
