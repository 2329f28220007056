"""What every command module of the CLI shares: the database it works on, and the batch it names.

Light at import (no SQLAlchemy): the parsers import this module, and the helpers load the
database code when a command calls them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Final

from shared.errors import InvalidInput, NotFound

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from shared.db import Batch
    from shared.settings import Settings

API_HELP: Final = "talk to the HTTP API at URL with the key in IPAB_API_KEY (no SQL/Redis/S3 access needed)"


@contextmanager
def database(settings: Settings) -> Iterator[sessionmaker[Session]]:
    """Sessions on the configured database, migrated to the latest schema; the engine is closed after."""
    from shared.db import ensure_database, make_engine, make_session_factory

    ensure_database(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


def batch_arg(*, session: Session, ref: str) -> Batch:
    """The batch a command's BATCH argument names (any tenant's: the CLI is the operator's); one line otherwise."""
    from scheduler.batches.lookup import find_batch

    try:
        return find_batch(session=session, ref=ref)
    except NotFound:
        raise InvalidInput("BATCH", ref, "no batch has this name or id; `ipab batches` lists them") from None


def read_batch(sessions: sessionmaker[Session], ref: str) -> Batch:
    """`batch_arg` in a transaction of its own."""
    from shared.jobs import transaction

    with transaction(sessions) as session:
        return batch_arg(session=session, ref=ref)


def final_line(counts: dict[str, int]) -> str:
    """`done: 38 succeeded, 2 failed`: the statuses that have jobs, in their usual order, after a watch."""
    from shared.job_status import STATUSES

    shown = [f"{counts[status]} {status}" for status in STATUSES if counts.get(status)]
    return "done: " + (", ".join(shown) if shown else "no jobs")
