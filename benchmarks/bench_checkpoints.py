"""What checkpointing costs a job: the engine alone vs the engine under the worker's Recorder.

`python -m benchmarks.bench_checkpoints [--repeats N] [--every-epochs N] [--no-postgres]`

Each run of the example specs is timed twice, side by side and interleaved (the order
alternating): ``engines.train`` alone, and ``engines.train`` with ``workers.tasks.Recorder``
writing epoch rows and a checkpoint every ``record_every_epochs`` epochs or
``record_every_seconds`` seconds (the settings' defaults unless given), then ``finish_job``,
as a worker does after its claim, against a real SQLite file (and PostgreSQL when it answers).
It prints medians, their ratio and the cost of one write; it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from service import db, jobs, spec
from service.settings import Settings
from service.spec import JobSpec
from workers import engines
from workers.data import build_train_data
from workers.engines.base import Checkpoint, TrainData
from workers.tasks import Recorder

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SPECS = ("tutorial_torch", "tutorial_numpy", "minibatch")
PG_ADMIN_URL = os.environ.get(
    "LRQ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def load(name: str) -> JobSpec:
    document = spec.load_document(EXAMPLES / f"{name}.yaml")
    document["device"] = "cpu"
    return spec.validate(document)


def claimed_job(job: JobSpec, settings: Settings) -> jobs.Claim:
    """A fresh job, claimed as a worker claims it (not timed)."""
    url = settings.resolved_database_url()
    with db.transaction(url) as session:
        (row,) = jobs.create_jobs([job], session=session, max_attempts=1)
        job_id = row.id
    with db.transaction(url) as session:
        claim = jobs.claim_job(
            job_id, session=session, worker="bench:0", lease_seconds=settings.lease_seconds
        )
    assert claim is not None
    return claim


def engine_alone(job: JobSpec, data: TrainData, _claim: jobs.Claim, _settings: Settings) -> int:
    engines.train(job, data)
    return 0


def engine_recorded(job: JobSpec, data: TrainData, claim: jobs.Claim, settings: Settings) -> int:
    """Train under a Recorder, then finish the job, as a worker does; returns the writes."""
    recorder = Recorder(claim, settings)
    writes = 0
    flush = recorder.flush

    def counted(checkpoint: Checkpoint | None) -> None:
        nonlocal writes
        writes += 1
        flush(checkpoint)

    recorder.flush = counted  # type: ignore[method-assign]
    run = engines.train(job, data, on_epoch=recorder.on_epoch, should_stop=recorder.should_stop)
    with db.transaction(settings.resolved_database_url()) as session:
        jobs.finish_job(
            claim.job_id,
            attempt=claim.attempt,
            state=run.status,
            rows=recorder.pending,
            result=run.summary,
            session=session,
        )
    return writes + 1


Runner = Callable[[JobSpec, TrainData, jobs.Claim, Settings], int]


def measure(
    job: JobSpec, data: TrainData, settings: Settings, repeats: int
) -> tuple[float, float, int]:
    """Median seconds of the engine alone and recorded, and the writes a recorded run makes."""
    times: dict[str, list[float]] = {"alone": [], "recorded": []}
    runners: list[tuple[str, Runner]] = [("alone", engine_alone), ("recorded", engine_recorded)]
    writes = 0
    for _, runner in runners:  # warm up imports, the backend and the connection pool
        runner(job, data, claimed_job(job, settings), settings)
    for index in range(repeats):
        for label, runner in runners if index % 2 == 0 else runners[::-1]:
            claim = claimed_job(job, settings)
            began = time.perf_counter()
            made = runner(job, data, claim, settings)
            times[label].append(time.perf_counter() - began)
            writes = max(writes, made)
    return statistics.median(times["alone"]), statistics.median(times["recorded"]), writes


@contextmanager
def sqlite_database() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="lrq-bench-") as folder:
        url = f"sqlite:///{Path(folder) / 'lrq.db'}"
        db.upgrade(url)
        yield url
        db.dispose_all()


@contextmanager
def postgres_database() -> Iterator[str | None]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"lrq_bench_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError:
        admin.dispose()
        yield None
        return
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        db.upgrade(url)
        yield url
    finally:
        db.dispose_all()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--every-epochs", type=int, default=None)
    parser.add_argument("--every-seconds", type=float, default=None)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    overrides: dict[str, float] = {}
    if args.every_epochs is not None:
        overrides["record_every_epochs"] = args.every_epochs
    if args.every_seconds is not None:
        overrides["record_every_seconds"] = args.every_seconds
    cadence = Settings(**overrides)
    print(
        f"checkpoint every {cadence.record_every_epochs} epochs or "
        f"{cadence.record_every_seconds:g}s; median of {args.repeats}, interleaved\n"
    )
    header = f"{'spec':<16}{'database':<12}{'epochs':>7}{'writes':>8}"
    header += f"{'engine s':>11}{'recorded s':>12}{'ratio':>8}{'ms/write':>10}"
    print(header)
    print("-" * len(header))
    with sqlite_database() as sqlite_url, postgres_database() as pg_url:
        databases = [("sqlite", sqlite_url)]
        if pg_url is not None and not args.no_postgres:
            databases.append(("postgresql", pg_url))
        for name in SPECS:
            job = load(name)
            data = build_train_data(job)
            for label, url in databases:
                settings = cadence.model_copy(update={"database_url": url})
                alone, recorded, writes = measure(job, data, settings, args.repeats)
                print(
                    f"{name:<16}{label:<12}{job.epochs:>7}{writes:>8}"
                    f"{alone:>11.4f}{recorded:>12.4f}{recorded / alone:>8.2f}"
                    f"{(recorded - alone) / writes * 1000:>10.2f}"
                )
        if pg_url is None:
            print(f"\n(PostgreSQL at {db.mask_url(PG_ADMIN_URL)} did not answer: skipped)")


if __name__ == "__main__":
    main()
