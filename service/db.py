"""Engines and sessions (one engine per process and URL); callers own the transaction."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from service.errors import SchemaError

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

_engines: dict[tuple[str, int], Engine] = {}


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


def _postgresql_session(dbapi_connection: Any, _record: Any) -> None:
    from service.settings import get_settings

    # A worker cut off inside a transaction keeps its job's row locked until TCP gives up,
    # hours later, and every reconciler's reclaim of that job waits on the lock. The server
    # drops such a session before the lease lapses: keepalives find a peer that is gone (even
    # mid-statement), and lrq never idles inside a transaction, so a live but stuck one ends too.
    lease = get_settings().lease_seconds
    probe = max(1, int(lease / 8))
    options = {
        "idle_in_transaction_session_timeout": max(1000, int(lease * 500)),
        "tcp_keepalives_idle": probe,
        "tcp_keepalives_interval": probe,
        "tcp_keepalives_count": 3,
    }
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    cursor = dbapi_connection.cursor()
    for name, value in options.items():
        cursor.execute("SELECT set_config(%s, %s, false)", (name, str(value)))
    cursor.close()
    dbapi_connection.autocommit = autocommit


def get_engine(url: str) -> Engine:
    """The engine for a URL, made once per process (never inherited across a fork)."""
    key = (url, os.getpid())
    engine = _engines.get(key)
    if engine is None:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"timeout": 30})
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = create_engine(url, pool_pre_ping=True, pool_recycle=1800)
            if parsed.get_backend_name() == "postgresql":
                event.listen(engine, "connect", _postgresql_session)
        _engines[key] = engine
    return engine


def sessionmaker_for(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


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


def upgrade(url: str, revision: str = "head") -> None:
    """Run the migrations up to a revision."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


_checked: set[tuple[str, int]] = set()


def check_schema(url: str) -> None:
    """Refuse to run on a missing or old schema, naming the command that fixes it."""
    key = (url, os.getpid())
    if key in _checked:
        return
    current, head = current_revision(url), head_revision(url)
    if current != head:
        state = "has no lrq schema" if current is None else f"is at schema {current}"
        raise SchemaError(
            f"the database {mask_url(url)} {state}, this lrq needs {head}: run `lrq db upgrade`"
        )
    _checked.add(key)
