"""Epoch rows written per second, a sweep's history read back, and the results of many jobs.

`python -m benchmarks.bench_db [--repeats N] [--no-postgres]`

On a fresh PostgreSQL database (and a SQLite file): epoch rows written with
``jobs.record_epochs`` in batches of 50 (the worker's default cadence) and 1,000 (a chunked
engine's), rows per second; a 100-job x 1,000-epoch history read by ``jobs.history_frame``
beside ``pandas.read_sql`` of the same rows and query; the results frame of 10,000 jobs by
``jobs.results_frame_of`` (plain rows) beside ``results_frame`` of ORM objects. Each pair is
timed side by side, alternating, and the medians and ratios are printed; it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from benchmarks.services import postgres_answers, postgres_database
from service import db, jobs
from service.models import Epoch, Job
from service.spec import JobSpec

SPEC = {
    "name": "bench-db",
    "data": {"synthetic": {"n_samples": 40, "n_features": 2, "coefficients": [1, 2], "seed": 1}},
    "backend": "numpy",
    "optimizer": {"lr": 0.001},
    "epochs": 1000,
}
SUMMARY = {"train_loss": 0.5, "test_loss": 0.6, "r2": 0.9, "weights": [1.0, 2.0], "bias": 0.1}


def median_of(action: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def new_jobs(url: str, count: int, *, state: str = "running") -> list[str]:
    """``count`` jobs, claimed (attempt 1) or finished with a summary."""
    job = JobSpec.model_validate(SPEC)
    with db.transaction(url) as session:
        ids = [j.id for j in jobs.create_jobs([job] * count, session=session, max_attempts=3)]
        values: dict[str, Any] = {"state": state, "attempts": 1}
        if state == "succeeded":
            values.update(result=SUMMARY, epochs_done=SPEC["epochs"])
        session.execute(update(Job).where(Job.id.in_(ids)).values(**values))
    return ids


def write_rate(url: str, batch: int, total: int) -> float:
    """Epoch rows per second through ``record_epochs``, ``batch`` rows per transaction."""
    [job_id] = new_jobs(url, 1)
    rows = [jobs.EpochRow(e, 1.0 / e, 2.0 / e, 0.001) for e in range(1, total + 1)]
    start = time.perf_counter()
    for first in range(0, total, batch):
        with db.transaction(url) as session:
            jobs.record_epochs(
                job_id,
                rows[first : first + batch],
                attempt=1,
                checkpoint={"epoch": first + batch},
                session=session,
                lease_seconds=60,
            )
    return total / (time.perf_counter() - start)


def pack_write_rate(url: str, members: int, batch: int, total: int) -> float:
    """Epoch rows per second through ``record_many``: a pack of ``members`` jobs writing
    ``batch`` epochs each per transaction (one fenced UPDATE a job, one INSERT for all)."""
    ids = new_jobs(url, members)
    rows = [jobs.EpochRow(e, 1.0 / e, 2.0 / e, 0.001) for e in range(1, total + 1)]
    start = time.perf_counter()
    for first in range(0, total, batch):
        recordings = [
            jobs.Recording(job_id, 1, rows[first : first + batch], {"epoch": first + batch})
            for job_id in ids
        ]
        with db.transaction(url) as session:
            jobs.record_many(recordings, session=session, lease_seconds=60)
    return members * total / (time.perf_counter() - start)


def fill_histories(url: str, ids: list[str], epochs: int) -> None:
    with db.transaction(url) as session:
        for job_id in ids:
            jobs._upsert_epochs(
                job_id,
                [
                    jobs.EpochRow(e, 1.0 / e, None if e % 2 else 2.0 / e, 0.5)
                    for e in range(1, epochs + 1)
                ],
                session,
            )


def run(label: str, url: str, repeats: int) -> list[str]:
    import pandas as pd

    lines = [f"{label}:"]
    for batch, total in ((50, 20_000), (1000, 200_000)):
        rates = [write_rate(url, batch, total) for _ in range(repeats)]
        lines.append(
            f"  epoch rows written, {batch:5d} a transaction: "
            f"{statistics.median(rates):10,.0f} rows/s"
        )

    rates = [pack_write_rate(url, 64, 50, 2_000) for _ in range(repeats)]
    lines.append(
        f"  epoch rows written by a pack of 64, 50 each a transaction: "
        f"{statistics.median(rates):10,.0f} rows/s"
    )

    history_ids = new_jobs(url, 100, state="succeeded")
    fill_histories(url, history_ids, 1000)
    query = (
        select(Epoch.job_id, Epoch.epoch, Epoch.train_loss, Epoch.test_loss, Epoch.seconds)
        .where(Epoch.job_id.in_(history_ids))
        .order_by(Epoch.job_id, Epoch.epoch)
    )

    def ours() -> None:
        with db.transaction(url) as session:
            frame = jobs.history_frame(history_ids, session=session)
        assert len(frame) == 100_000

    def pandas_read() -> None:
        with db.get_engine(url).connect() as connection:
            frame = pd.read_sql(query, connection)
        assert len(frame) == 100_000

    timed: dict[str, list[float]] = {"history_frame": [], "pandas.read_sql": []}
    for repeat in range(repeats):
        pair = [("history_frame", ours), ("pandas.read_sql", pandas_read)]
        for name, action in pair if repeat % 2 == 0 else pair[::-1]:
            timed[name].append(median_of(action, 1))
    ours_s, theirs_s = (statistics.median(timed[k]) for k in ("history_frame", "pandas.read_sql"))
    lines.append(
        f"  100 x 1,000-epoch history: history_frame {ours_s:.3f} s, pandas.read_sql "
        f"{theirs_s:.3f} s, ratio {ours_s / theirs_s:.2f}"
    )

    result_ids = history_ids + new_jobs(url, 9_900, state="succeeded")

    def rows_frame() -> None:
        with db.transaction(url) as session:
            frame = jobs.results_frame_of(result_ids, session=session)
        assert len(frame) == 10_000

    def orm_frame() -> None:
        with db.transaction(url) as session:
            frame = jobs.results_frame(jobs.find_jobs(session=session, ids=result_ids))
        assert len(frame) == 10_000

    timed = {"rows": [], "orm": []}
    for repeat in range(repeats):
        pair = [("rows", rows_frame), ("orm", orm_frame)]
        for name, action in pair if repeat % 2 == 0 else pair[::-1]:
            timed[name].append(median_of(action, 1))
    rows_s, orm_s = statistics.median(timed["rows"]), statistics.median(timed["orm"])
    lines.append(
        f"  results of 10,000 jobs: results_frame_of {rows_s:.3f} s, results_frame(ORM jobs) "
        f"{orm_s:.3f} s, ratio {rows_s / orm_s:.2f}"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    lines: list[str] = []
    if not args.no_postgres and postgres_answers():
        with postgres_database() as url:
            lines += run("PostgreSQL", url, args.repeats)
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{Path(folder) / 'bench.db'}"
        db.upgrade(url)
        lines += run("SQLite", url, args.repeats)
        db.dispose_all()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
