"""Many claims at once, straight on SQLite and PostgreSQL: sibling claims, one-transaction
records, and freeing everything a dead process held."""

from __future__ import annotations

from typing import Any

from service import db, jobs
from service.models import Job, Sweep
from service.spec import JobSpec
from tests.support import small_spec


def _sweep(url: str, *, pack: bool, lrs: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4)) -> list[str]:
    specs = [JobSpec.model_validate({**small_spec(), "optimizer": {"lr": lr}}) for lr in lrs]
    with db.transaction(url) as session:
        made = jobs.create_jobs(
            specs,
            session=session,
            max_attempts=3,
            sweep=(small_spec(), ["optimizer.lr=" + ",".join(map(str, lrs))]),
            pack=pack,
        )
        return [job.id for job in made]


def _claim_pack(url: str, job_id: str, worker: str, limit: int = 10, **kw: Any) -> list[Any]:
    with db.transaction(url) as session:
        first = jobs.claim_job(job_id, session=session, worker=worker, lease_seconds=60)
        assert first is not None
        return [
            first,
            *jobs.claim_siblings(
                job_id,
                session=session,
                worker=worker,
                lease_seconds=60,
                limit=limit,
                fits=kw.get("fits", lambda spec, dataset: True),
            ),
        ]


def _state(url: str, job_id: str) -> Job:
    with db.transaction(url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_siblings_are_claimed_each_with_its_own_attempt(database_url: str) -> None:
    ids = _sweep(database_url, pack=True)
    claims = _claim_pack(database_url, ids[0], "host:1", limit=2)
    assert len(claims) == 3 and claims[0].job_id == ids[0]
    assert all(c.attempt == 1 for c in claims)
    states = {i: _state(database_url, i).state for i in ids}
    assert sorted(states.values()) == ["queued", "running", "running", "running"]
    # Their own messages then find them running under a live lease: duplicates, skipped.
    with db.transaction(database_url) as session:
        sibling = claims[1].job_id
        assert jobs.claim_job(sibling, session=session, worker="host:2", lease_seconds=60) is None


def test_a_sweep_submitted_without_packing_has_no_siblings_to_claim(database_url: str) -> None:
    ids = _sweep(database_url, pack=False)
    assert [c.job_id for c in _claim_pack(database_url, ids[0], "host:1")] == ids[:1]
    with db.transaction(database_url) as session:
        (sweep,) = session.query(Sweep).all()
        assert sweep.pack is False


def test_only_siblings_that_fit_are_claimed(database_url: str) -> None:
    ids = _sweep(database_url, pack=True)
    claims = _claim_pack(
        database_url, ids[0], "host:1", fits=lambda spec, _: spec["optimizer"]["lr"] > 0.25
    )
    assert sorted(c.job_id for c in claims) == sorted([ids[0], ids[2], ids[3]])


def test_record_many_writes_each_claim_and_refuses_only_a_lost_one(database_url: str) -> None:
    ids = _sweep(database_url, pack=True)
    claims = _claim_pack(database_url, ids[0], "host:1")
    stale = jobs.Claim(claims[1].job_id, claims[1].attempt + 5, {}, None, None)
    recordings = [
        jobs.Recording(c.job_id, c.attempt, [jobs.EpochRow(1, 2.0, None, 0.1)], {"epoch": 1})
        for c in [claims[0], stale, *claims[2:]]
    ]
    with db.transaction(database_url) as session:
        seen = jobs.record_many(recordings, session=session, lease_seconds=60)
    assert seen[stale.job_id] is None
    assert all(seen[i] is not None for i in ids if i != stale.job_id)
    for job_id in ids:
        job = _state(database_url, job_id)
        written = job_id != stale.job_id
        assert (job.epochs_done, job.checkpoint is not None) == (int(written), written)
    with db.transaction(database_url) as session:
        lost = jobs.renew_leases(
            [(c.job_id, c.attempt) for c in [claims[0], stale]],
            session=session,
            lease_seconds=60,
        )
    assert lost == [stale.job_id]


def test_a_dead_holder_frees_every_job_it_held(database_url: str) -> None:
    ids = _sweep(database_url, pack=True)
    with db.transaction(database_url) as session:
        jobs.mark_published(ids, session=session)
    held = [c.job_id for c in _claim_pack(database_url, ids[0], "host:1", limit=1)]
    (other,) = [i for i in ids if i not in held][:1]
    _claim_pack(database_url, other, "host:2", limit=0)
    with db.transaction(database_url) as session:
        assert sorted(jobs.release_held("host:1", session=session)) == sorted(held)
    for job_id in ids:
        job = _state(database_url, job_id)
        assert job.state == ("running" if job_id == other else "queued")
        # The released jobs' messages are spent: the reconciler sends new ones.
        assert (job.published_at is None) == (job_id in held)
    with db.transaction(database_url) as session:
        failed = jobs.fail_held("host:2", error="timed out", session=session)
    assert failed == [other]
    assert _state(database_url, other).state == "failed"
