"""What a job costs on the wire: broker round trips per publish, database transactions and
statements per job, and frames built straight from rows."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import small_spec, submit_ids


def test_a_sweeps_messages_are_one_pipeline_whatever_its_size(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis.client
    import redis.connection

    from service.queue import held_job_ids, make_app, publish
    from service.settings import Settings

    sends: list[int] = []
    pipelines: list[int] = []
    send = redis.connection.AbstractConnection.send_packed_command
    execute = redis.client.Pipeline.execute

    def counted_send(self: Any, command: Any, check_health: bool = True) -> None:
        sends.append(1)
        send(self, command, check_health)

    def counted_execute(self: Any, raise_on_error: bool = True) -> Any:
        names = [command[0][0] for command in self.command_stack]
        pipelines.append(names.count("LPUSH"))
        return execute(self, raise_on_error)

    # Counting wrappers around the real client: every command still reaches the real Redis.
    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted_send)
    monkeypatch.setattr(redis.client.Pipeline, "execute", counted_execute)
    app = make_app(Settings(broker_url=redis_url))
    round_trips = []
    for size in (3, 300):
        ids = [f"{size:04d}{i:028x}" for i in range(size)]
        sends.clear()
        pipelines.clear()
        publish(
            app, [(job_id, "cpu" if i % 2 else "gpu") for i, job_id in enumerate(ids)], timeout=5
        )
        # Declaring the two queues reads their lengths in pipelines of their own.
        assert [n for n in pipelines if n] == [size], "every message in one pipeline"
        round_trips.append(len(sends))
        assert set(ids) <= (held_job_ids(app) or set())
    assert round_trips[1] <= round_trips[0], round_trips
    assert round_trips[0] < 30, round_trips  # connecting and declaring, not one per message


@pytest.fixture
def counted_statements() -> Iterator[dict[str, list[Any]]]:
    """Every commit and statement any engine sends while the test runs (SQLAlchemy events)."""
    from sqlalchemy import Engine, event

    seen: dict[str, list[Any]] = {"commits": [], "statements": []}

    def on_commit(_connection: Any) -> None:
        seen["commits"].append(len(seen["statements"]))

    def on_statement(
        _conn: Any, _cursor: Any, statement: str, _params: Any, _context: Any, many: bool
    ) -> None:
        seen["statements"].append((statement.split()[0], many))

    event.listen(Engine, "commit", on_commit)
    event.listen(Engine, "before_cursor_execute", on_statement)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", on_statement)
        event.remove(Engine, "commit", on_commit)


@pytest.mark.parametrize("alone", [True, False], ids=["alone", "in-an-unpacked-sweep"])
def test_a_short_job_costs_four_transactions_from_submit_to_finish(
    lrq_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    counted_statements: dict[str, list[Any]],
    alone: bool,
) -> None:
    from service import db, jobs
    from service.settings import Settings
    from workers.tasks import execute_job

    # No timed flush mid-run on a loaded machine: this job records only when it finishes.
    monkeypatch.setenv("LRQ_RECORD_EVERY_SECONDS", "600")
    spec = tmp_path / "small.json"
    spec.write_text(json.dumps({**small_spec(), "epochs": 7}))
    # A job of a --no-pack sweep: its claim says the sweep does not pack, so the worker asks
    # the database for no siblings.
    sweep = () if alone else ("--grid", "seed=1,2", "--no-pack")
    job_id = submit_ids(str(spec), *sweep)[0]
    submit_commits = len(counted_statements["commits"])
    worker_from = len(counted_statements["statements"])
    outcome = execute_job(job_id, Settings())
    assert outcome == "succeeded"
    commits = counted_statements["commits"]
    worker_statements = counted_statements["statements"][worker_from:]
    # Submit: insert the job, stamp it published. The worker: claim, then finish (the last
    # epochs, the result and the state) -- one statement each, the epochs in one INSERT.
    assert submit_commits == 2
    assert len(commits) == 4
    url = lrq_env["LRQ_DATABASE_URL"]
    many = url.startswith("sqlite")  # SQLite's epochs go as one executemany, in this process
    assert worker_statements == [
        ("UPDATE", False),
        ("UPDATE", False),
        ("INSERT", many),
        ("SELECT", False),
    ]
    with db.transaction(url) as session:
        frame = jobs.history_frame([job_id], session=session)
    assert frame["epoch"].tolist() == list(range(1, 8))


def test_a_batch_of_epochs_is_one_insert_statement(
    database_url: str, counted_statements: dict[str, list[Any]]
) -> None:
    from service import db, jobs
    from service.spec import JobSpec

    with db.transaction(database_url) as session:
        [job] = jobs.create_jobs(
            [JobSpec.model_validate({**small_spec(), "epochs": 2500})],
            session=session,
            max_attempts=1,
        )
    with db.transaction(database_url) as session:
        claim = jobs.claim_job(job.id, session=session, worker="here:1", lease_seconds=60)
    assert claim is not None
    rows = [
        jobs.EpochRow(e, 1.0 / e, None if e % 3 else 2.0 / e, 0.001 * e) for e in range(1, 2501)
    ]
    # PostgreSQL: one INSERT ... SELECT unnest(arrays) a batch; SQLite (in this process): one
    # executemany of a prepared statement.
    insert = ("INSERT", database_url.startswith("sqlite"))
    # A diverging run's losses: infinities must come back as they went in (a NaN is
    # PostgreSQL's alone: SQLite stores it as NULL).
    odd = (math.inf, -math.inf, math.nan if insert == ("INSERT", False) else 0.0)
    rows[1997:2000] = [jobs.EpochRow(1998 + i, v, v, 0.5) for i, v in enumerate(odd)]
    counted_statements["statements"].clear()
    with db.transaction(database_url) as session:
        jobs.record_epochs(
            job.id,
            rows[:1000],
            attempt=claim.attempt,
            checkpoint=None,
            session=session,
            lease_seconds=60,
        )
    assert counted_statements["statements"] == [("UPDATE", False), insert]
    counted_statements["statements"].clear()
    with db.transaction(database_url) as session:
        jobs.finish_job(
            job.id, attempt=claim.attempt, state="succeeded", rows=rows[1000:], session=session
        )
    assert counted_statements["statements"] == [("UPDATE", False), insert, ("SELECT", False)]
    with db.transaction(database_url) as session:
        frame = jobs.history_frame([job.id], session=session)
    assert frame["epoch"].tolist() == list(range(1, 2501))
    train = frame["train_loss"].tolist()
    assert train[:1997] + train[2000:] == [r.train_loss for r in rows[:1997] + rows[2000:]]
    assert train[1997:1999] == [math.inf, -math.inf]
    assert math.isnan(train[1999]) if math.isnan(odd[2]) else train[1999] == odd[2]
    stored = [None if math.isnan(v) else v for v in frame["test_loss"].tolist()]  # NaN: none
    assert stored[:1997] + stored[2000:] == [r.test_loss for r in rows[:1997] + rows[2000:]]
    assert stored[1997:1999] == [math.inf, -math.inf]
    assert stored[1999] is None if math.isnan(odd[2]) else stored[1999] == odd[2]


def test_the_results_frame_from_rows_equals_the_one_from_jobs(database_url: str) -> None:
    import pandas as pd
    from sqlalchemy import update

    from service import db, jobs
    from service.models import Job
    from service.spec import JobSpec

    specs = [JobSpec.model_validate({**small_spec(), "seed": seed}) for seed in range(30)]
    with db.transaction(database_url) as session:
        made = jobs.create_jobs(specs, session=session, max_attempts=2)
        ids = [job.id for job in made]
        expected: dict[str, float | None] = dict.fromkeys(ids)
        for i, job_id in enumerate(ids[::2]):
            expected[job_id] = 1.0 / (i + 1)
            summary = {"train_loss": 1.0 / (i + 1), "weights": [i, 2.0], "device": "cpu"}
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(state="succeeded", result=summary, epochs_done=3, attempts=1)
            )
    with db.transaction(database_url) as session:
        from_rows = jobs.results_frame_of(list(reversed(ids)), session=session)
        found = jobs.find_jobs(session=session, ids=ids)
        from_jobs = jobs.results_frame(found)
    assert from_rows["id"].tolist() == [j.id for j in found]  # oldest first, as find_jobs
    assert sorted(from_rows["spec.seed"].tolist()) == list(range(30))
    losses = [None if math.isnan(v) else v for v in from_rows["train_loss"].tolist()]
    assert losses == [expected[j.id] for j in found]
    assert from_rows["state"].value_counts().to_dict() == {"succeeded": 15, "queued": 15}
    pd.testing.assert_frame_equal(from_rows, from_jobs)


@pytest.mark.parametrize("packed", [False, True], ids=["alone", "packed"])
def test_the_soft_time_limit_stops_a_job_at_its_own_chunk_boundary(
    lrq_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, packed: bool
) -> None:
    """Here no Celery signal can raise the soft limit (the job runs in this process): the
    worker's own check at the next epoch ends it, with its epochs so far recorded."""
    from service import db
    from service.settings import Settings
    from tests.support import load_jobs
    from workers.tasks import execute_job

    monkeypatch.setenv("LRQ_SOFT_TIME_LIMIT", "1")
    spec = tmp_path / "long.json"
    spec.write_text(json.dumps({**small_spec(), "epochs": 1_000_000}))
    grid = ("--grid", "optimizer.lr=0.01,0.02") if packed else ()
    ids = submit_ids(str(spec), *grid)
    assert execute_job(ids[0], Settings()) == "failed"
    found = load_jobs(lrq_env["LRQ_DATABASE_URL"], ids)
    assert [(j.state, j.error) for j in found] == [
        ("failed", "timed out: the soft time limit of 1s")
    ] * len(ids)
    assert all(j.lease_expires_at is None for j in found)
    db.dispose_all()
