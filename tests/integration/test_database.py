"""The database as the client sees it: unreachable servers, session options, big reads and
concurrent migrations, against real PostgreSQL and SQLite."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import OperationalError

from service import db, jobs
from service.models import Epoch
from service.spec import JobSpec
from tests.support import free_port, run_cli, set_lrq_env, small_spec

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A TCP listener that accepts every connection and never sends a byte."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", free_port()))
    listener.listen(64)
    listener.settimeout(0.2)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        for sock in accepted:
            sock.close()
        listener.close()


def test_commands_against_a_database_that_never_answers_fail_with_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_url: str
) -> None:
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(small_spec()))
    with silent_server() as port:
        url = f"postgresql+psycopg://postgres:pw@127.0.0.1:{port}/lrq"
        env = set_lrq_env(
            monkeypatch, tmp_path, database_url=url, broker_url=redis_url, db_connect_timeout="2"
        )
        shown = f"postgresql+psycopg://postgres:***@127.0.0.1:{port}/lrq"
        for command in (["submit", str(spec_path)], ["status"], ["reconcile"], ["worker"]):
            # A hang fails here, through the timeout, rather than through a timed assertion.
            done = subprocess.run(
                [sys.executable, "-m", "service.cli", *command],
                env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
                capture_output=True,
                text=True,
                timeout=90,
                check=False,
            )
            assert done.returncode == 1, (command, done.stdout, done.stderr)
            assert done.stderr == f"error: database {shown}: connection timeout expired\n", command
            assert done.stdout == ""


def test_a_client_statement_is_bounded_and_a_worker_session_is_not(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pg_url: str
) -> None:
    set_lrq_env(monkeypatch, tmp_path, database_url=pg_url, db_statement_timeout="1")
    with pytest.raises(OperationalError, match="statement timeout"), db.transaction(pg_url) as s:
        s.execute(select(func.pg_sleep(3)))
    with db.sessionmaker_for(pg_url, worker=True)() as session:
        assert session.scalar(text("SHOW statement_timeout")) == "0"
        # The worker's own guard: the lease (6 s here) bounds an idle transaction, at half.
        assert session.scalar(text("SHOW idle_in_transaction_session_timeout")) == "3s"
    with db.sessionmaker_for(pg_url)() as session:
        assert session.scalar(text("SHOW idle_in_transaction_session_timeout")) == "0"


def _big_sweep(url: str, *, n_jobs: int, epochs: int) -> tuple[str, list[str]]:
    """A sweep of finished-looking jobs with ``epochs`` epoch rows each, inserted in bulk."""
    specs = [JobSpec.model_validate({**small_spec(), "seed": i}) for i in range(n_jobs)]
    with db.transaction(url) as session:
        made = jobs.create_jobs(
            specs,
            session=session,
            max_attempts=3,
            sweep=(small_spec(), ["seed=" + ",".join(str(i) for i in range(n_jobs))]),
        )
        ids, sweep_id = [j.id for j in made], made[0].sweep_id
        for job in made:
            job.state, job.epochs_done = "succeeded", epochs
    assert sweep_id is not None
    with db.get_engine(url).begin() as connection:
        for job_id in ids:
            rows = [
                {
                    "job_id": job_id,
                    "epoch": e,
                    "train_loss": 1.0 / e,
                    "test_loss": None if e % 2 else 2.0 / e,
                    "seconds": 0.5,
                }
                for e in range(1, epochs + 1)
            ]
            connection.execute(insert(Epoch), rows)
    return sweep_id, ids


def test_the_history_of_a_large_sweep_outlives_a_short_lease(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pg_url: str
) -> None:
    """The worker's idle-in-transaction guard (half a lease) never applies to a client's read."""
    db.upgrade(pg_url)
    set_lrq_env(monkeypatch, tmp_path, database_url=pg_url, lease_seconds="1")
    n_jobs, epochs = 10, 20_000
    sweep_id, ids = _big_sweep(pg_url, n_jobs=n_jobs, epochs=epochs)
    out = tmp_path / "history.csv"

    result = run_cli("results", "--sweep", sweep_id, "--history", "--format", "csv", "-o", str(out))

    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[0] == "job_id,epoch,train_loss,test_loss,seconds"
    assert len(lines) == 1 + n_jobs * epochs
    first = sorted(ids)[0]
    assert lines[1:4] == [
        f"{first},1,1.0,,0.5",
        f"{first},2,0.5,1.0,0.5",
        f"{first},3,{1.0 / 3!r},,0.5",
    ]


def test_a_history_frame_holds_no_object_per_row(sqlite_url: str) -> None:
    db.upgrade(sqlite_url)
    n_jobs, epochs = 4, 25_000
    _, ids = _big_sweep(sqlite_url, n_jobs=n_jobs, epochs=epochs)
    with db.transaction(sqlite_url) as session:
        tracemalloc.start()
        try:
            frame = jobs.history_frame(ids, session=session)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    rows = n_jobs * epochs
    assert len(frame) == rows
    assert frame["epoch"].tolist()[:3] == [1, 2, 3]
    first = frame[frame["job_id"] == sorted(ids)[0]]
    assert first["train_loss"].tolist() == [1.0 / e for e in range(1, epochs + 1)]
    assert first["test_loss"].isna().sum() == epochs // 2
    print(f"\nhistory_frame: {peak / rows:.0f} bytes of peak memory per epoch row")
    # An ORM object per row peaked near 1.7 KB a row; arrays need tens of bytes.
    assert peak / rows < 400


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_upgrades_at_once_both_succeed(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    base = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url")
    with _fresh_databases(base, 3) as urls:
        for url in urls:  # a race may go either way once: a few fresh databases, one at a time
            env = set_lrq_env(monkeypatch, tmp_path, database_url=url)
            running = [
                subprocess.Popen(
                    [sys.executable, "-m", "service.cli", "db", "upgrade"],
                    env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for _ in range(2)
            ]
            outcomes = [(p.wait(120), *p.communicate()) for p in running]
            assert [code for code, _, _ in outcomes] == [0, 0], outcomes
            assert db.current_revision(url) == db.head_revision(url)
            db.dispose_all()


@contextlib.contextmanager
def _fresh_databases(base: str, count: int) -> Iterator[list[str]]:
    """``count`` empty databases beside ``base`` (PostgreSQL ones dropped afterwards)."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    parsed = make_url(base)
    if parsed.get_backend_name() == "sqlite":
        yield [base.replace("lrq.db", f"lrq-{i}.db") for i in range(count)]
        return
    names = [f"{parsed.database}_{i}" for i in range(count)]
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            for name in names:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
        yield [parsed.set(database=n).render_as_string(hide_password=False) for n in names]
    finally:
        db.dispose_all()
        with admin.connect() as connection:
            for name in names:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
