"""Fixtures: real Redis, PostgreSQL and SQLite databases, and the environment a worker reads."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import RedisServer, need, reset_caches, set_lrq_env

PG_ADMIN_URL = os.environ.get(
    "LRQ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(autouse=True)
def _fresh_caches() -> Iterator[None]:
    reset_caches()
    yield
    reset_caches()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis of the test session's own, on a free port."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if not redis_server.ping():
        redis_server.start()  # a fault test may have stopped it
    redis_server.client().flushall()
    return redis_server.url


def _pg_admin() -> object:
    from sqlalchemy import create_engine
    from sqlalchemy.exc import OperationalError

    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect():
            pass
    except OperationalError as exc:
        engine.dispose()
        need(f"PostgreSQL unreachable at {PG_ADMIN_URL}: {type(exc.orig).__name__}")
    return engine


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    engine = _pg_admin()
    name = f"lrq_test_{uuid.uuid4().hex[:12]}"
    with engine.connect() as conn:  # type: ignore[attr-defined]
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    reset_caches()
    with engine.connect() as conn:  # type: ignore[attr-defined]
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()  # type: ignore[attr-defined]


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'lrq.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """An upgraded database of each kind."""
    from service import db

    url: str = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    db.upgrade(url)
    return url


@pytest.fixture
def lrq_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, database_url: str, redis_url: str
) -> dict[str, str]:
    """LRQ_* variables for a distributed setup on this machine, with short leases."""
    values = set_lrq_env(monkeypatch, tmp_path, database_url=database_url, broker_url=redis_url)
    return {**os.environ, **values}
