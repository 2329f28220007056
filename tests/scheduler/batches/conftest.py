"""The API's fixtures (an in-process app on the test's services, tenants with keys), for batch-layer tests."""

from tests.scheduler.api.conftest import alice, api_settings, client

__all__ = ["alice", "api_settings", "client"]
