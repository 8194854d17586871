"""Many claims at once, straight on SQLite and PostgreSQL: sibling claims, one-transaction
records, and freeing everything a dead process held."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlalchemy import update

from service import db, jobs
from service.errors import StateError
from service.jobs import utcnow
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
        siblings, more = jobs.claim_siblings(
            job_id,
            session=session,
            worker=worker,
            lease_seconds=60,
            limit=limit,
            fits=kw.get("fits", lambda spec, dataset: True),
        )
        if "more" in kw:
            assert more is kw["more"]
        return [first, *siblings]


def _state(url: str, job_id: str) -> Job:
    with db.transaction(url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_siblings_are_claimed_each_with_its_own_attempt(database_url: str) -> None:
    ids = _sweep(database_url, pack=True)
    claims = _claim_pack(database_url, ids[0], "host:1", limit=2, more=True)
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
        database_url,
        ids[0],
        "host:1",
        limit=2,
        more=False,  # the one left queued does not fit: no more for this pack's data
        fits=lambda spec, _: spec["optimizer"]["lr"] > 0.25,
    )
    assert sorted(c.job_id for c in claims) == sorted([ids[0], ids[2], ids[3]])


def test_a_taken_jobs_message_carries_the_rest_of_its_packing_sweep(database_url: str) -> None:
    ids = _sweep(database_url, pack=True)
    claims = _claim_pack(database_url, ids[0], "host:1", limit=1, more=True)
    with db.transaction(database_url) as session:
        carrier = jobs.pack_carrier(ids[0], session=session)
        assert carrier is not None and (carrier.job_id, carrier.attempt) == (ids[0], 0)
        rest, more = jobs.claim_siblings(
            ids[0],
            session=session,
            worker="host:2",
            lease_seconds=60,
            limit=5,
            fits=lambda spec, dataset: True,
        )
    held = {c.job_id for c in claims}
    assert len(held) == 2 and ids[0] in held
    assert sorted(c.job_id for c in rest) == sorted(set(ids) - held) and more is False
    unpacked = _sweep(database_url, pack=False)
    with db.transaction(database_url) as session:
        assert jobs.pack_carrier(unpacked[0], session=session) is None


def test_a_packing_sweeps_queued_jobs_are_carried_by_any_held_message_of_it(
    database_url: str,
) -> None:
    packed, unpacked = _sweep(database_url, pack=True), _sweep(database_url, pack=False)
    with db.transaction(database_url) as session:
        jobs.mark_published([*packed, *unpacked], session=session)
        # Published long ago (past the grace): the broker's contents decide.
        session.execute(update(Job).values(published_at=utcnow() - dt.timedelta(seconds=60)))
    _claim_pack(database_url, packed[0], "host:1", limit=0)
    with db.transaction(database_url) as session:
        # One message of the packing sweep held (naming its running job): its queued jobs
        # are carried; the other sweep's jobs each need their own.
        need = jobs.jobs_to_publish(session=session, held={packed[0], unpacked[0]})
        assert sorted(job_id for job_id, _ in need) == sorted(unpacked[1:])
        # No message of it held: each queued job of it gets one.
        need = jobs.jobs_to_publish(session=session, held={unpacked[0]})
        assert sorted(job_id for job_id, _ in need) == sorted([*packed[1:], *unpacked[1:]])


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


def _epochs(url: str, job_id: str) -> list[tuple[int, float]]:
    from sqlalchemy import select

    from service.models import Epoch

    with db.transaction(url) as session:
        rows = session.execute(
            select(Epoch.epoch, Epoch.train_loss)
            .where(Epoch.job_id == job_id)
            .order_by(Epoch.epoch)
        ).all()
        return [(int(e), float(loss)) for e, loss in rows]


def test_finish_many_finishes_each_claim_in_one_transaction_and_skips_a_lost_one(
    database_url: str,
) -> None:
    ids = _sweep(database_url, pack=True)
    claims = _claim_pack(database_url, ids[0], "host:1")
    stale = claims[1].job_id

    def finishing(index: int, claim: Any, rows: list[jobs.EpochRow]) -> jobs.Finish:
        attempt = claim.attempt + (5 if claim.job_id == stale else 0)
        return jobs.Finish(claim.job_id, attempt, "succeeded", rows, {"point": index})

    # A succeeded job whose rows do not add up (epoch 2 without epoch 1) refuses the whole
    # batch: nothing of it is written, every job stays running.
    broken = [
        finishing(i, c, [jobs.EpochRow(2 if i == 2 else 1, 1.0 + i, None, 0.1)])
        for i, c in enumerate(claims)
    ]
    refused = pytest.raises(StateError, match="1 epoch rows stored, 2 expected")
    with refused, db.transaction(database_url) as session:
        jobs.finish_many(broken, session=session)
    assert {_state(database_url, c.job_id).state for c in claims} == {"running"}
    assert all(_epochs(database_url, c.job_id) == [] for c in claims)

    finishes = [
        finishing(i, c, [jobs.EpochRow(1, 1.0 + i, 0.5, 0.1)]) for i, c in enumerate(claims)
    ]
    with db.transaction(database_url) as session:
        assert jobs.finish_many(finishes, session=session) == [stale]
    for index, claim in enumerate(claims):
        job = _state(database_url, claim.job_id)
        if claim.job_id == stale:
            assert (job.state, job.result, _epochs(database_url, stale)) == ("running", None, [])
        else:
            assert (job.state, job.result, job.epochs_done) == ("succeeded", {"point": index}, 1)
            assert _epochs(database_url, claim.job_id) == [(1, 1.0 + index)]
