"""Engines and sessions (one engine per process and URL); callers own the transaction."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from service.errors import SchemaError

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

_engines: dict[tuple[str, int, bool], Engine] = {}
#: Whether this process's connections are a worker's (see ``use_worker_sessions``).
_worker_process = False


def use_worker_sessions(enabled: bool = True) -> None:
    """Give this process's later connections a worker's session options, not a client's."""
    global _worker_process
    _worker_process = enabled


def mask_url(url: str) -> str:
    """A URL safe to print: the password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable url>"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (lrq status) run beside a writing worker; the timeout waits out locks.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _postgresql_options(*, worker: bool) -> dict[str, int]:
    """The session settings of a worker's or a client's PostgreSQL connections."""
    from service.settings import get_settings

    settings = get_settings()
    # A worker cut off inside a transaction keeps its job's row locked until TCP gives up,
    # hours later, and every reconciler's reclaim of that job waits on the lock. The server
    # drops such a session before the lease lapses: keepalives find a peer that is gone (even
    # mid-statement), and a worker never idles inside a transaction, so a stuck one ends too.
    lease = settings.lease_seconds
    probe = max(1, int(lease / 8))
    options = {
        "tcp_keepalives_idle": probe,
        "tcp_keepalives_interval": probe,
        "tcp_keepalives_count": 3,
    }
    if worker:
        options["idle_in_transaction_session_timeout"] = max(1000, int(lease * 500))
    else:
        # A client may idle in its read (turning a long history into a frame) far longer
        # than a lease, but no one command may hold the server without end.
        options["statement_timeout"] = max(1, int(settings.db_statement_timeout * 1000))
    return options


def _postgresql_session(options: dict[str, int]) -> Callable[[Any, Any], None]:
    """A connect hook setting the session's options (with bound parameters)."""

    def apply(dbapi_connection: Any, _record: Any) -> None:
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        cursor = dbapi_connection.cursor()
        for name, value in options.items():
            cursor.execute("SELECT set_config(%s, %s, false)", (name, str(value)))
        cursor.close()
        dbapi_connection.autocommit = autocommit

    return apply


def get_engine(url: str, *, worker: bool | None = None) -> Engine:
    """The engine for a URL, made once per process (never inherited across a fork).

    ``worker`` picks a worker's or a client's session options; None means this process's.
    """
    as_worker = _worker_process if worker is None else worker
    key = (url, os.getpid(), as_worker)
    engine = _engines.get(key)
    if engine is None:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"timeout": 30})
            event.listen(engine, "connect", _sqlite_pragmas)
        elif parsed.get_backend_name() == "postgresql":
            from service.settings import get_settings

            # Without it a server that accepts and never answers hangs every command forever.
            timeout = max(1, math.ceil(get_settings().db_connect_timeout))
            engine = create_engine(
                url,
                pool_pre_ping=True,
                pool_recycle=1800,
                connect_args={"connect_timeout": timeout},
            )
            options = _postgresql_options(worker=as_worker)
            event.listen(engine, "connect", _postgresql_session(options))
        else:
            engine = create_engine(url, pool_pre_ping=True, pool_recycle=1800)
        _engines[key] = engine
    return engine


def sessionmaker_for(url: str, *, worker: bool | None = None) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url, worker=worker), expire_on_commit=False)


@contextmanager
def transaction(url: str) -> Iterator[Session]:
    """A session inside one transaction, committed on success."""
    with sessionmaker_for(url)() as session, session.begin():
        yield session


def dispose_all(*, close: bool = True) -> None:
    """Drop the engines; after a fork pass close=False to leave the parent's connections be."""
    for key in list(_engines):
        _engines.pop(key).dispose(close=close)
    _checked.clear()


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["url"] = url
    return config


def head_revision(url: str) -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with get_engine(url).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


#: The PostgreSQL advisory lock key migrations hold ("lrq" in ASCII).
MIGRATION_LOCK = 0x6C7271


@contextmanager
def migration_lock(url: str) -> Iterator[None]:
    """Serialise migrations: two at once would both create the same tables and rows."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        from sqlalchemy import func, select

        # A session lock on a connection of its own: it outlives Alembic's transactions.
        with get_engine(url).connect() as connection:
            connection.execute(select(func.pg_advisory_lock(MIGRATION_LOCK)))
            connection.commit()
            try:
                yield
            finally:
                connection.execute(select(func.pg_advisory_unlock(MIGRATION_LOCK)))
                connection.commit()
    elif parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        import fcntl

        path = Path(f"{parsed.database}.migrate-lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
            yield
    else:
        yield


def upgrade(url: str, revision: str = "head") -> None:
    """Run the migrations up to a revision (one migrating process at a time)."""
    from alembic import command

    with migration_lock(url):
        command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    with migration_lock(url):
        command.downgrade(alembic_config(url), revision)


_checked: set[tuple[str, int]] = set()

_REVISION_LINE = re.compile(r"^(down_revision|revision)\b[^=]*=\s*(None|[\"']([^\"']+)[\"'])", re.M)


def _light_head_revision() -> str | None:
    """The head revision read from the migration files' own lines, without importing Alembic.

    None when the files do not form one plain chain (Alembic is then asked instead).
    """
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (MIGRATIONS_DIR / "versions").glob("*.py"):
        found = dict((key, name) for key, _, name in _REVISION_LINE.findall(path.read_text()))
        if "revision" not in found:
            continue
        revisions.add(found["revision"])
        if found.get("down_revision"):
            parents.add(found["down_revision"])
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def _light_current_revision(url: str) -> str | None:
    """The database's recorded revision, read with one SELECT (None without lrq's schema)."""
    from sqlalchemy import column, select, table
    from sqlalchemy.exc import DBAPIError

    version = table("alembic_version", column("version_num"))
    with get_engine(url).connect() as connection:
        try:
            found = connection.execute(select(version.c.version_num)).scalars().all()
        except DBAPIError as exc:
            if "alembic_version" not in str(exc.orig):
                raise  # not a missing table: the database itself is out of reach
            return None
    return found[0] if len(found) == 1 else ",".join(sorted(found)) or None


def check_schema(url: str) -> None:
    """Refuse to run on a missing or old schema, naming the command that fixes it."""
    key = (url, os.getpid())
    if key in _checked:
        return
    # Alembic's own import costs more than the rest of `lrq status`: read the revisions plainly.
    head = _light_head_revision() or head_revision(url)
    current = _light_current_revision(url)
    if current != head:
        state = "has no lrq schema" if current is None else f"is at schema {current}"
        raise SchemaError(
            f"the database {mask_url(url)} {state}, this lrq needs {head}: run `lrq db upgrade`"
        )
    _checked.add(key)
