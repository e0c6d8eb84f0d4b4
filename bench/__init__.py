"""Benchmarks: python -m bench.run_all (or make bench). See bench/README.md."""
