"""The API's fixtures (an in-process app on the test's services, tenants with keys), for usage tests
that read a report through both faces."""

from __future__ import annotations

from tests.scheduler.api.conftest import admin, alice, api_settings, bob, client

__all__ = ["admin", "alice", "api_settings", "bob", "client"]
