"""Development tools, not part of the runtime install: the demo, local services for tests and
benchmarks (Redis, SeaweedFS, PostgreSQL), and the tiny random-weight model sets.

Run from the repository: `python -m devkit demo`, `python -m devkit synth DIR`.
"""
