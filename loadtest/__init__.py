"""Benchmarks of tfs-router and its workers (``python -m loadtest.bench_worker`` ...)."""
