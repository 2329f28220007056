"""The database server's clock, as a SQL expression: the one clock every lease is measured by.

A lease written with one host's clock and compared with another's breaks as soon as the two
disagree by more than the lease minus a heartbeat: healthy jobs get re-queued, or dead ones
kept. So claim, renew, expire and finish compute every lease time in SQL, relative to the
server's current time, and no worker or reconciler clock takes part.

Values stay naive UTC, stored as before: on PostgreSQL a `timestamp without time zone`
(`timezone('utc', now())`); on SQLite the text SQLAlchemy writes for a DateTime,
`YYYY-MM-DD HH:MM:SS.ffffff`. SQLite's `%f` gives milliseconds (`SS.SSS`), so three zeros
complete the six digits: the text compares and parses exactly like SQLAlchemy's own.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from sqlalchemy import DateTime, Float, literal
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement

# strftime's %f is "SS.SSS"; the literal 000 pads it to SQLAlchemy's microseconds.
SQLITE_DATETIME_FORMAT: Final = "%Y-%m-%d %H:%M:%f000"


class server_now(FunctionElement[datetime]):  # lower case: it reads as a SQL function
    """The database server's current UTC time plus `offset_s` seconds (a bound value or a column)."""

    type = DateTime()
    inherit_cache = True
    name = "server_now"

    def __init__(self, offset_s: ColumnElement[Any] | float = 0.0) -> None:
        offset = offset_s if isinstance(offset_s, ColumnElement) else literal(float(offset_s), Float())
        super().__init__(offset)


def _offset(element: server_now, compiler: SQLCompiler, **kw: Any) -> str:
    (offset,) = element.clauses
    return compiler.process(offset, **kw)


@compiles(server_now, "sqlite")
def _sqlite_now(element: server_now, compiler: SQLCompiler, **kw: Any) -> str:
    # 'now' is fixed for the whole statement, so every use in one UPDATE agrees.
    return f"strftime('{SQLITE_DATETIME_FORMAT}', 'now', printf('%+.6f seconds', {_offset(element, compiler, **kw)}))"


@compiles(server_now, "postgresql")
def _postgresql_now(element: server_now, compiler: SQLCompiler, **kw: Any) -> str:
    # now() is the transaction's start: one instant for every use in the transaction.
    offset = _offset(element, compiler, **kw)
    return f"(timezone('utc', now()) + make_interval(secs => CAST({offset} AS DOUBLE PRECISION)))"


@compiles(server_now)
def _other_now(element: server_now, compiler: SQLCompiler, **kw: Any) -> str:
    raise NotImplementedError(
        f"database dialect {compiler.dialect.name!r} is not supported for leases; use SQLite or PostgreSQL"
    )


class elapsed_s(FunctionElement[float]):  # lower case: it reads as a SQL function
    """Seconds from `start` to `end` (stored or `server_now()` times), as a float: a job's queue and total time."""

    type = Float()
    inherit_cache = True
    name = "elapsed_s"

    def __init__(self, start: ColumnElement[Any], end: ColumnElement[Any]) -> None:
        super().__init__(start, end)


def _ends(element: elapsed_s, compiler: SQLCompiler, **kw: Any) -> tuple[str, str]:
    start, end = element.clauses
    return compiler.process(start, **kw), compiler.process(end, **kw)


@compiles(elapsed_s, "sqlite")
def _sqlite_elapsed(element: elapsed_s, compiler: SQLCompiler, **kw: Any) -> str:
    # julianday reads the stored text, fractional seconds included; a double's 1e-10 day is 10 us.
    start, end = _ends(element, compiler, **kw)
    return f"((julianday({end}) - julianday({start})) * 86400.0)"


@compiles(elapsed_s, "postgresql")
def _postgresql_elapsed(element: elapsed_s, compiler: SQLCompiler, **kw: Any) -> str:
    start, end = _ends(element, compiler, **kw)
    return f"CAST(EXTRACT(EPOCH FROM ({end} - {start})) AS DOUBLE PRECISION)"
