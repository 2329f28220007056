"""The SQL schema and its migrations, on a SQLite file and on PostgreSQL."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Dialect, Index, inspect, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.schema import CreateIndex

from shared.db import (
    TERMINAL,
    Base,
    Batch,
    Job,
    JobStatus,
    alembic_config,
    ensure_database,
    make_engine,
    make_session_factory,
    migration_heads,
    new_id,
    serialized_writes,
    upgrade_database,
    utcnow,
)
from shared.spec import SEED_LIMIT
from tests.scheduler.submission.conftest import run_ipab

HEAD = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def _job(batch_id: str, dedupe_key: str, seed: int = 1) -> Job:
    return Job(batch_id=batch_id, line=1, dedupe_key=dedupe_key, spec="{}", seed=seed)


def test_migrations_build_exactly_the_orm_schema(database_url: str) -> None:
    upgrade_database(database_url)
    upgrade_database(database_url)  # a second run changes nothing

    engine = make_engine(database_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn)
        assert context.get_current_revision() == HEAD
        assert compare_metadata(context, Base.metadata) == []
        tables = set(inspect(conn).get_table_names())
        indexes = {ix["name"] for ix in inspect(conn).get_indexes("jobs")}
    engine.dispose()
    assert {"batches", "jobs", "reference_images", "alembic_version"} <= tables
    assert {"ix_jobs_batch_id_status_lane_queued_at_line", "ix_jobs_status_lease_expires_at"} <= indexes


PARTIAL_INDEXES = {
    "ix_jobs_status_finished_at": "WHERE finished_at IS NOT NULL",
    "ix_jobs_data_state_expires_at": "WHERE expires_at IS NOT NULL",
}


def _jobs_index(name: str) -> Index:
    return next(ix for ix in Job.__table__.indexes if ix.name == name)


@pytest.mark.parametrize("dialect", [postgresql.dialect(), sqlite.dialect()], ids=["postgresql", "sqlite"])
def test_the_models_partial_indexes_are_partial_on_postgresql_and_sqlite(dialect: Dialect) -> None:
    for name, where in PARTIAL_INDEXES.items():
        ddl = str(CreateIndex(_jobs_index(name)).compile(dialect=dialect))

        assert ddl.startswith(f"CREATE INDEX {name} ON jobs (") and ddl.endswith(f") {where}")


def test_migrations_make_the_partial_indexes_the_models_declare(sqlite_url: str) -> None:
    # compare_metadata does not compare an index's WHERE: the migrated index's own SQL does.
    upgrade_database(sqlite_url)
    engine = make_engine(sqlite_url)
    with engine.connect() as conn:
        stored = dict(conn.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'index'")).tuples().all())
        declared = {name: str(CreateIndex(_jobs_index(name)).compile(conn)) for name in PARTIAL_INDEXES}
    engine.dispose()

    assert {name: stored[name] for name in PARTIAL_INDEXES} == declared


def test_a_job_row_keeps_the_largest_seed_and_gets_its_defaults(database_url: str) -> None:
    ensure_database(database_url)
    engine = make_engine(database_url)
    sessions = make_session_factory(engine)

    with sessions.begin() as session:
        batch = Batch(name="b", model_set="m")
        session.add(batch)
        session.flush()
        session.add(_job(batch.id, "k" * 64, seed=SEED_LIMIT - 1))
    with sessions() as session:
        job = session.scalars(select(Job)).one()
    engine.dispose()

    assert job.seed == SEED_LIMIT - 1
    assert (job.status, job.attempts, job.enqueued_at) == (JobStatus.queued, 0, None)
    assert job.queued_at <= utcnow() and job.queued_at.tzinfo is None


def test_a_dedupe_key_is_unique_within_its_batch_only(database_url: str) -> None:
    ensure_database(database_url)
    engine = make_engine(database_url)
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        one, two = Batch(name="one", model_set="m"), Batch(name="two", model_set="m")
        session.add_all([one, two])
        session.flush()
        session.add_all([_job(one.id, "same"), _job(two.id, "same")])

    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.add(_job(one.id, "same"))
    engine.dispose()


def test_sqlite_runs_in_wal_mode_with_foreign_keys(sqlite_url: str) -> None:
    ensure_database(sqlite_url)
    engine = make_engine(sqlite_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    with pytest.raises(IntegrityError), make_session_factory(engine).begin() as session:
        session.add(_job("no-such-batch", "k"))
    engine.dispose()


def test_processes_starting_at_once_migrate_a_fresh_database_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    errors: list[BaseException] = []

    def upgrade() -> None:
        try:
            upgrade_database(url)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=upgrade) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    engine = make_engine(url)
    with engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == HEAD
    engine.dispose()


def test_terminal_statuses_are_the_final_ones() -> None:
    assert {JobStatus.succeeded, JobStatus.failed, JobStatus.canceled} == TERMINAL
    assert JobStatus.queued == "queued" and f"{JobStatus.running}" == "running"


def test_ipab_db_upgrade_creates_the_schema(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    run = run_ipab(["db", "upgrade"], env={"IPAB_DATABASE_URL": sqlite_url}, monkeypatch=monkeypatch)

    assert run.code == 0 and "latest schema" in run.out
    engine = make_engine(sqlite_url)
    with engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == HEAD
    engine.dispose()


def test_an_insert_ignoring_duplicates_says_whether_its_row_went_in(database_url: str) -> None:
    from scheduler.tenants import ensure_tenant

    ensure_database(database_url)
    engine = make_engine(database_url)
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        assert ensure_tenant(session=session, name="first") is not None  # created: its secret, once
    with sessions.begin() as session:
        assert ensure_tenant(session=session, name="first") is None  # there already
    engine.dispose()


def test_sqlite_writers_of_one_process_take_turns_and_all_commit(database_url: str) -> None:
    """Threads that write at once all commit (on SQLite they queue on the engine's lock, not in the busy handler)."""
    ensure_database(database_url)
    engine = make_engine(database_url)
    sessions = make_session_factory(engine)
    lock = serialized_writes(sessions)
    assert (lock is serialized_writes(sessions)) == (engine.dialect.name == "sqlite")  # one lock per engine
    with sessions.begin() as session:
        batch = Batch(id=new_id(), name="b", model_set="m", job_count=0)
        session.add(batch)
    inside, most_inside = [0], [0]
    count = threading.Lock()

    def write(i: int) -> None:
        for n in range(10):
            with serialized_writes(sessions), sessions.begin() as session:
                with count:
                    inside[0] += 1
                    most_inside[0] = max(most_inside[0], inside[0])
                session.add(_job(batch.id, f"k{i}-{n}"))
                session.flush()
                with count:
                    inside[0] -= 1

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with sessions() as session:
        assert len(session.scalars(select(Job.id).where(Job.batch_id == batch.id)).all()) == 80
    if engine.dialect.name == "sqlite":
        assert most_inside[0] == 1
    engine.dispose()


def test_the_heads_read_from_the_migration_files_are_alembics() -> None:
    assert migration_heads() == frozenset(ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads())


def test_a_database_at_the_head_is_not_migrated_again_and_one_behind_it_is(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    upgrade_database(database_url)
    upgrades: list[str] = []
    monkeypatch.setattr("shared.db.upgrade_database", upgrades.append)
    monkeypatch.setattr("shared.db._ensured", set())
    ensure_database(database_url)
    assert upgrades == []  # at the head: one query, and Alembic is never loaded

    engine = make_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0001'"))
    engine.dispose()
    monkeypatch.setattr("shared.db._ensured", set())
    ensure_database(database_url)
    assert upgrades == [database_url]
