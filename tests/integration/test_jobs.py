"""The job lifecycle functions straight on SQLite and PostgreSQL: fences, retries, the cap."""

from __future__ import annotations

from typing import Any

import pytest

from service import db, jobs
from service.models import Job
from service.spec import JobSpec
from tests.support import small_spec


def _submit(url: str, *, max_attempts: int = 3) -> str:
    with db.transaction(url) as session:
        (job,) = jobs.create_jobs(
            [JobSpec.model_validate(small_spec())], session=session, max_attempts=max_attempts
        )
        return job.id


def _claim(url: str, job_id: str, worker: str) -> jobs.Claim | None:
    with db.transaction(url) as session:
        return jobs.claim_job(job_id, session=session, worker=worker, lease_seconds=60)


def _record(url: str, claim: jobs.Claim, epoch: int, loss: float) -> None:
    with db.transaction(url) as session:
        jobs.record_epochs(
            claim.job_id,
            [jobs.EpochRow(epoch, loss, None, 0.1)],
            attempt=claim.attempt,
            checkpoint={"epoch": epoch, "loss": loss},
            session=session,
            lease_seconds=60,
        )


def _finish(url: str, claim: jobs.Claim, state: str, **values: Any) -> None:
    with db.transaction(url) as session:
        jobs.finish_job(claim.job_id, attempt=claim.attempt, state=state, session=session, **values)


def _job(url: str, job_id: str) -> Job:
    with db.transaction(url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_a_claim_from_before_a_retry_is_fenced_out(database_url: str) -> None:
    """A stale worker (paused or cut off) of the first run writes nothing after retry + claim."""
    url = database_url
    job_id = _submit(url)
    stale = _claim(url, job_id, "paused:1")
    assert stale is not None
    _record(url, stale, 1, 10.0)
    # The attempt is failed from outside (a hard time limit) while its worker is paused.
    with db.transaction(url) as session:
        assert jobs.fail_job(job_id, error="timed out", session=session)
        jobs.retry_jobs([job_id], session=session)
    fresh = _claim(url, job_id, "fresh:2")
    assert fresh is not None
    assert fresh.attempt != stale.attempt
    assert fresh.checkpoint is None

    with pytest.raises(jobs.LeaseLostError):
        _record(url, stale, 1, 99.0)
    with pytest.raises(jobs.LeaseLostError):
        _finish(url, stale, "succeeded", rows=[jobs.EpochRow(2, 98.0, None, 0.1)])
    with db.transaction(url) as session:
        renewed = jobs.renew_lease(job_id, attempt=stale.attempt, session=session, lease_seconds=9)
    assert not renewed

    _record(url, fresh, 1, 5.0)
    job = _job(url, job_id)
    assert (job.state, job.worker) == ("running", "fresh:2")
    assert job.checkpoint == {"epoch": 1, "loss": 5.0}
    with db.transaction(url) as session:
        history = [(r.epoch, r.train_loss) for r in jobs.history_rows([job_id], session=session)]
    assert history == [(1, 5.0)]
    _finish(url, fresh, "succeeded", rows=[jobs.EpochRow(2, 4.0, None, 0.1)])
    assert _job(url, job_id).state == "succeeded"


def test_the_attempt_cap_counts_claims_since_the_last_retry(database_url: str) -> None:
    url = database_url
    job_id = _submit(url, max_attempts=1)
    first = _claim(url, job_id, "gone:1")
    assert first is not None
    with db.transaction(url) as session:
        assert jobs.release_job(job_id, worker="gone:1", session=session)
    # The one allowed claim is spent: the next one fails the job instead.
    assert _claim(url, job_id, "next:2") is None
    job = _job(url, job_id)
    assert (job.state, job.error) == ("failed", "worker lost: 1 attempts, the limit")

    with db.transaction(url) as session:
        jobs.retry_jobs([job_id], session=session)
    again = _claim(url, job_id, "next:2")
    assert again is not None and again.attempt == 2
    _finish(url, again, "failed", error="boom")
    with db.transaction(url) as session:
        jobs.retry_jobs([job_id], session=session)
    third = _claim(url, job_id, "next:3")
    assert third is not None and third.attempt == 3
    job = _job(url, job_id)
    assert (job.attempts, job.attempts_at_retry) == (3, 2)


def test_the_migrations_match_the_models(database_url: str) -> None:
    from alembic import command

    command.check(db.alembic_config(database_url))  # raises when a change lacks a migration
    db.downgrade(database_url, "0001")
    db.upgrade(database_url)
    assert db.current_revision(database_url) == db.head_revision(database_url)
