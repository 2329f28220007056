"""The HTTP API (`ipab api`): FastAPI routers by resource over the same validator and submit path as the CLI."""
