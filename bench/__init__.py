"""Benchmarks: ipab against the bare pipeline, raw Redis and a naive Celery loop (`make bench`).

Not tests: each benchmark starts its own private services, measures, stops them, and
returns a dict of figures that `bench.run` writes to BENCHMARKS.md.
"""
