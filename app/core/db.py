"""Database engine and sessions. SQLite runs in WAL mode with a busy timeout so the API and the
worker processes can share one file; PostgreSQL needs nothing special.

Two kinds of session: `get_sessionmaker()` for anything that may write (on SQLite its transactions
are BEGIN IMMEDIATE), and `get_read_sessionmaker()` for pure reads on the request path (plain,
deferred BEGIN on SQLite: in WAL mode such a reader never waits for, nor blocks, a writer);
`read_transaction()` is the same read without a session, for Core statements."""

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from app.core.settings import get_settings

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Execution option set on the read-only engine; the SQLite "begin" hook reads it, other dialects ignore it.
READ_ONLY_OPTION = "tuneforge_read_only"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # Deeper than SQLAlchemy's default pool (5 + 10 overflow), under which a burst of concurrent
        # requests opens overflow connections (each running the pragmas below) and closes them again
        # on return. Idle SQLite connections cost next to nothing.
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=32,
            max_overflow=32,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            # Let SQLAlchemy issue BEGIN itself (see the "begin" hook) so writes take the lock up front.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            if conn.get_execution_options().get(READ_ONLY_OPTION):
                # Deferred: a WAL reader reads its snapshot without the write lock, so hot read paths
                # (API-key and model lookups) never sleep in the busy handler behind a writer.
                conn.exec_driver_sql("BEGIN")
            else:
                # BEGIN IMMEDIATE: a read-then-write transaction never fails half-way with "database
                # is locked" (a deferred one could not upgrade to a write after another commit).
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().resolved_database_url)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


def get_read_sessionmaker() -> sessionmaker[Session]:
    """Sessions for transactions that only read (never flush a write in one: on SQLite a deferred
    transaction that tries to write after another process committed fails with SQLITE_BUSY)."""
    return _read_sessionmaker(get_engine())


@lru_cache(maxsize=4)
def _read_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    # Keyed on the engine so it follows get_engine() when that cache is cleared; shares its pool.
    return sessionmaker(_read_engine(engine), expire_on_commit=False)


@contextmanager
def read_transaction() -> Iterator[Connection]:
    """A read-only transaction on a plain connection, no ORM session: for the Core-statement
    lookups every inference request makes (key, model). A session around them cost more than the
    queries (measured: 258 against 127 us for both on SQLite)."""
    with _read_engine(get_engine()).begin() as connection:
        yield connection


@lru_cache(maxsize=4)
def _read_engine(engine: Engine) -> Engine:
    return engine.execution_options(**{READ_ONLY_OPTION: True})


@contextmanager
def session_scope() -> Iterator[Session]:
    """A transaction: committed on success, rolled back on error."""
    with get_sessionmaker()() as session, session.begin():
        yield session
