"""Submission: rows from manifests and grids, their reference images, and the one submit path
that turns them into jobs (used by `ipab submit`, the API and nightly plans alike)."""
