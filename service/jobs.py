"""The job state machine: submit, claim, record, finish, cancel, retry, reconcile, query.

Every function takes the caller's ``session`` and never commits it. Writes that race other
workers are conditional UPDATEs fenced by ``attempts``: a worker whose claim was taken over
(its lease lapsed) finds its writes refused and stops.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import os
import socket
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import ColumnElement, Row, delete, func, or_, select, update
from sqlalchemy.orm import Session

from service.errors import NotFoundError, StateError
from service.models import TERMINAL, Dataset, Epoch, Job, Sweep

if TYPE_CHECKING:
    import pandas as pd
    from sqlalchemy import Table as SqlTable

    from service.datasets import Table
    from service.spec import JobSpec


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_id() -> str:
    return uuid.uuid4().hex


def worker_identity() -> str:
    """``host:pid`` of this process: the lease holder's name."""
    return f"{socket.gethostname()}:{os.getpid()}"


def json_safe(value: Any) -> Any:
    """Non-finite floats become None: JSON (and PostgreSQL's json) has no NaN or inf."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


# -- datasets -------------------------------------------------------------------------------


def register_dataset(table: Table, *, name: str, session: Session) -> Dataset:
    """Store a table under its content hash; registering the same content again is a no-op."""
    from service.datasets import digest, encode

    blob = encode(table)
    key = digest(blob)
    existing = session.get(Dataset, key)
    if existing is not None:
        return existing
    dataset = Dataset(
        id=key,
        name=name,
        target=table.target,
        features=list(table.columns),
        n_rows=len(table.y),
        n_bytes=len(blob),
        content=blob,
        created_at=utcnow(),
    )
    session.add(dataset)
    session.flush()
    return dataset


def find_dataset(ref: str, *, session: Session) -> Dataset:
    """A dataset by id, unique id prefix, or name (the newest of that name)."""
    found = session.get(Dataset, ref)
    if found is not None:
        return found
    named = session.scalars(
        select(Dataset).where(Dataset.name == ref).order_by(Dataset.created_at.desc()).limit(1)
    ).first()
    if named is not None:
        return named
    if len(ref) >= 4 and all(c in "0123456789abcdef" for c in ref):
        matches = session.scalars(
            select(Dataset).where(Dataset.id.startswith(ref, autoescape=True)).limit(2)
        ).all()
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise NotFoundError(f"data.dataset: prefix {ref!r} matches more than one dataset")
    raise NotFoundError(f"data.dataset: no dataset with id or name {ref!r}")


def list_datasets(*, session: Session) -> list[Dataset]:
    return list(session.scalars(select(Dataset).order_by(Dataset.created_at)))


# -- submit ---------------------------------------------------------------------------------


def create_jobs(
    specs: Sequence[JobSpec],
    *,
    session: Session,
    max_attempts: int,
    queue: str | None = None,
    sweep: tuple[dict[str, Any], list[str]] | None = None,
    pack: bool = False,
) -> list[Job]:
    """Insert queued jobs (and their sweep, packed or not); publishing happens after the commit."""
    now = utcnow()
    sweep_id = None
    if sweep is not None:
        base, grid = sweep
        sweep_id = new_id()
        session.add(
            Sweep(
                id=sweep_id,
                name=str(base.get("name", "sweep"))[:200],
                spec=json_safe(base),
                grid=grid,
                created_at=now,
                pack=pack,
            )
        )
        session.flush()  # the sweep row must exist before jobs refer to it
    jobs = [
        Job(
            id=new_id(),
            name=spec.name,
            sweep_id=sweep_id,
            dataset_id=spec.data.dataset,
            spec=spec.to_json(),
            backend=spec.backend,
            device=spec.device,
            queue=queue or spec.queue,
            state="queued",
            epochs_total=spec.epochs,
            epochs_done=0,
            attempts=0,
            max_attempts=max_attempts,
            cancel_requested=False,
            created_at=now,
        )
        for spec in specs
    ]
    session.add_all(jobs)
    session.flush()
    return jobs


def mark_published(job_ids: Iterable[str], *, session: Session) -> None:
    ids = list(job_ids)
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids)).values(published_at=utcnow()))


# -- claim ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    job_id: str
    attempt: int
    spec: dict[str, Any]
    checkpoint: dict[str, Any] | None
    dataset_id: str | None
    #: The job's sweep (None for a job submitted alone, which never packs).
    sweep_id: str | None = None
    #: Whether that sweep packs (its jobs may train together).
    packs: bool = False


def _holder_is_dead_here(worker: str | None) -> bool:
    """True when the lease holder was a process on this host that no longer exists."""
    if not worker:
        return False
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def claim_job(job_id: str, *, session: Session, worker: str, lease_seconds: float) -> Claim | None:
    """Take a job for one attempt, or None when it is not ours to run now."""
    # The usual case, a queued job with attempts left, in one statement; a concurrent claim
    # waits on the row and then finds it no longer queued.
    taken = _claim_queued([job_id], session=session, worker=worker, lease=lease_seconds)
    if taken:
        return taken[0]
    now = utcnow()
    job = session.get(Job, job_id)
    if job is None:
        return None
    lapsed = job.state == "running" and (
        (job.lease_expires_at is not None and job.lease_expires_at < now)
        or _holder_is_dead_here(job.worker)
    )
    if job.state != "queued" and not lapsed:
        return None  # running elsewhere under a live lease, or finished: a duplicate message
    # Read before the UPDATEs: the session synchronises ``job`` with what they write.
    seen, spec, checkpoint, dataset_id = job.attempts, job.spec, job.checkpoint, job.dataset_id
    sweep_id = job.sweep_id
    since_retry = seen - job.attempts_at_retry
    fence = (Job.id == job_id) & (Job.state == job.state) & (Job.attempts == seen)
    if since_retry >= job.max_attempts:
        session.execute(
            update(Job)
            .where(fence)
            .values(
                state="failed",
                error=f"worker lost: {since_retry} attempts, the limit",
                worker=None,
                lease_expires_at=None,
                finished_at=now,
            )
        )
        return None
    claimed = session.execute(
        update(Job)
        .where(fence)
        .values(
            state="running",
            attempts=Job.attempts + 1,
            worker=worker,
            lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
            started_at=func.coalesce(Job.started_at, now),
        )
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        return None
    packs = sweep_id is not None and bool(
        session.scalar(select(Sweep.pack).where(Sweep.id == sweep_id))
    )
    return Claim(
        job_id=job_id,
        attempt=seen + 1,
        spec=spec,
        checkpoint=checkpoint,
        dataset_id=dataset_id,
        sweep_id=sweep_id,
        packs=packs,
    )


def claim_siblings(
    job_id: str,
    *,
    session: Session,
    worker: str,
    lease_seconds: float,
    limit: int,
    fits: Callable[[dict[str, Any], str | None], bool],
) -> tuple[list[Claim], bool]:
    """Claim up to ``limit`` queued jobs of ``job_id``'s packing sweep that ``fits`` accepts;
    also whether more that fit were left queued.

    Each is claimed as ``claim_job`` claims one, with its own fenced attempt; a sibling taken
    meanwhile by another worker is passed over.
    """
    sweep_id = session.scalar(
        select(Job.sweep_id)
        .join(Sweep, Sweep.id == Job.sweep_id)
        .where((Job.id == job_id) & Sweep.pack.is_(True))
    )
    if sweep_id is None or limit <= 0:
        return [], False
    queued = session.execute(
        select(Job.id, Job.spec, Job.dataset_id)
        .where((Job.sweep_id == sweep_id) & (Job.state == "queued") & (Job.id != job_id))
        .order_by(Job.created_at, Job.id)
    ).all()
    fitting = [sibling for sibling, spec, dataset_id in queued if fits(spec, dataset_id)]
    claims: list[Claim] = []
    at = 0
    while len(claims) < limit and at < len(fitting):
        batch = fitting[at : at + limit - len(claims)]
        at += len(batch)
        claims.extend(_claim_queued(batch, session=session, worker=worker, lease=lease_seconds))
    return claims, at < len(fitting)


def _claim_queued(
    job_ids: Sequence[str], *, session: Session, worker: str, lease: float
) -> list[Claim]:
    """Claim those of ``job_ids`` still queued with attempts left, in one statement, each with
    its own attempt; one taken meanwhile by another worker does not come back."""
    now = utcnow()
    rows = session.execute(
        update(Job)
        .where(
            Job.id.in_(job_ids)
            & (Job.state == "queued")
            & (Job.attempts - Job.attempts_at_retry < Job.max_attempts)
        )
        .values(
            state="running",
            attempts=Job.attempts + 1,
            worker=worker,
            lease_expires_at=now + dt.timedelta(seconds=lease),
            started_at=func.coalesce(Job.started_at, now),
        )
        .returning(
            Job.id,
            Job.attempts,
            Job.spec,
            Job.checkpoint,
            Job.dataset_id,
            Job.sweep_id,
            # Whether the sweep packs comes back with the claim: no second round trip.
            select(Sweep.pack).where(Sweep.id == Job.sweep_id).scalar_subquery().label("packs"),
        )
        .execution_options(synchronize_session=False)
    ).all()
    order = {job_id: index for index, job_id in enumerate(job_ids)}
    return [
        Claim(r.id, r.attempts, r.spec, r.checkpoint, r.dataset_id, r.sweep_id, bool(r.packs))
        for r in sorted(rows, key=lambda r: order[r.id])
    ]


def pack_carrier(job_id: str, *, session: Session) -> Claim | None:
    """``job_id`` as the unheld head of a pack to claim (attempt 0), when its sweep packs."""
    row = session.execute(
        select(Job.spec, Job.dataset_id, Job.sweep_id)
        .join(Sweep, Sweep.id == Job.sweep_id)
        .where((Job.id == job_id) & Sweep.pack.is_(True))
    ).first()
    if row is None:
        return None
    return Claim(job_id, 0, row.spec, None, row.dataset_id, row.sweep_id, packs=True)


def _fenced(job_id: str, attempt: int) -> Any:
    return (Job.id == job_id) & (Job.state == "running") & (Job.attempts == attempt)


def renew_lease(job_id: str, *, attempt: int, session: Session, lease_seconds: float) -> bool:
    """Extend the lease; False when this attempt no longer owns the job."""
    result = session.execute(
        update(Job)
        .where(_fenced(job_id, attempt))
        .values(lease_expires_at=utcnow() + dt.timedelta(seconds=lease_seconds))
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def renew_leases(
    held: Sequence[tuple[str, int]], *, session: Session, lease_seconds: float
) -> list[str]:
    """Extend the leases of many (job id, attempt) claims; returns the ids no longer held."""
    return [
        job_id
        for job_id, attempt in held
        if not renew_lease(job_id, attempt=attempt, session=session, lease_seconds=lease_seconds)
    ]


def _held_by(worker: str, session: Session) -> list[str]:
    return list(
        session.scalars(select(Job.id).where((Job.state == "running") & (Job.worker == worker)))
    )


def release_held(worker: str, *, session: Session) -> list[str]:
    """Put every running job a (dead) process holds back to queued; returns their ids.

    A process running a pack holds many jobs while its message names one: the others'
    messages are spent, so they are marked unpublished for the reconciler to send again.
    """
    released = []
    for job_id in _held_by(worker, session):
        result = session.execute(
            update(Job)
            .where((Job.id == job_id) & (Job.state == "running") & (Job.worker == worker))
            .values(state="queued", worker=None, lease_expires_at=None, published_at=None)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            released.append(job_id)
    return released


def fail_held(worker: str, *, error: str, session: Session) -> list[str]:
    """Fail every running job a process holds (its time limit killed it); returns their ids."""
    return [
        job_id
        for job_id in _held_by(worker, session)
        if fail_job(job_id, error=error, worker=worker, session=session)
    ]


def release_job(job_id: str, *, worker: str, session: Session, unpublished: bool = False) -> bool:
    """Put a running job held by a (dead) worker back to queued, to be claimed again now.

    ``unpublished``: no message for it remains, so the reconciler is to send one.
    """
    values: dict[str, Any] = {"state": "queued", "worker": None, "lease_expires_at": None}
    if unpublished:
        values["published_at"] = None
    result = session.execute(
        update(Job)
        .where((Job.id == job_id) & (Job.state == "running") & (Job.worker == worker))
        .values(**values)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def hand_back_job(
    job_id: str, *, attempt: int, session: Session, unpublished: bool = False
) -> bool:
    """Put a job this attempt checkpointed for its worker's shutdown back to queued.

    The attempt is not counted against the cap (a deploy is not the job's fault), while
    ``attempts`` itself never goes back, so the fence still tells this attempt from later ones.
    ``unpublished``: no message for it remains, so the reconciler is to send one.
    """
    values: dict[str, Any] = {
        "state": "queued",
        "worker": None,
        "lease_expires_at": None,
        "attempts_at_retry": Job.attempts_at_retry + 1,
    }
    if unpublished:
        values["published_at"] = None
    result = session.execute(update(Job).where(_fenced(job_id, attempt)).values(**values))
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def fail_job(job_id: str, *, error: str, session: Session, worker: str | None = None) -> bool:
    """Fail a running job (held by ``worker`` when given), e.g. after a hard time limit."""
    condition = (Job.id == job_id) & (Job.state == "running")
    if worker is not None:
        condition &= Job.worker == worker
    result = session.execute(
        update(Job)
        .where(condition)
        .values(
            state="failed", error=error, worker=None, lease_expires_at=None, finished_at=utcnow()
        )
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


# -- record and finish ----------------------------------------------------------------------


@dataclass(frozen=True)
class EpochRow:
    epoch: int
    train_loss: float
    test_loss: float | None
    seconds: float


def _upsert_epochs(job_id: str, rows: Sequence[EpochRow], session: Session) -> None:
    """Insert or overwrite epoch rows in one statement (PostgreSQL) or one executemany."""
    _upsert_epochs_of([(job_id, rows)], session)


def _upsert_epochs_of(batches: Sequence[tuple[str, Sequence[EpochRow]]], session: Session) -> None:
    """Epoch rows of many jobs in one statement (PostgreSQL) or one executemany."""
    flat = [(job_id, r) for job_id, rows in batches for r in rows]
    if not flat:
        return
    # Imported here: the PostgreSQL dialect module alone costs the CLI ~50 ms at start.
    from sqlalchemy.dialects import postgresql, sqlite

    table = cast("SqlTable", Epoch.__table__)
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        # Five arrays, one INSERT ... SELECT unnest(...): the server runs one statement for
        # the whole batch, and the statement's text (so its compiled form) never changes.
        stmt: Any = postgresql.insert(table).from_select(
            ["job_id", "epoch", "train_loss", "test_loss", "seconds"], _unnest_epochs()
        )
        parameters: Any = {
            # Job ids are hex: no quoting needed inside the array literal.
            "job_ids": "{" + ",".join(_hex_id(job_id) for job_id, _ in flat) + "}",
            "epochs": "{" + ",".join(str(int(r.epoch)) for _, r in flat) + "}",
            "train_losses": _float_array([r.train_loss for _, r in flat]),
            "test_losses": _float_array([r.test_loss for _, r in flat]),
            "seconds": _float_array([r.seconds for _, r in flat]),
        }
    else:
        # SQLite runs in this process: an executemany is one prepared statement in a C loop.
        stmt = sqlite.insert(table)
        parameters = [
            {
                "job_id": job_id,
                "epoch": r.epoch,
                "train_loss": r.train_loss,
                "test_loss": r.test_loss,
                "seconds": r.seconds,
            }
            for job_id, r in flat
        ]
    stmt = stmt.on_conflict_do_update(
        index_elements=[table.c.job_id, table.c.epoch],
        set_={
            "train_loss": stmt.excluded.train_loss,
            "test_loss": stmt.excluded.test_loss,
            "seconds": stmt.excluded.seconds,
        },
    )
    connection.execute(stmt, parameters)


def _hex_id(job_id: str) -> str:
    if not job_id or not all(c in "0123456789abcdef" for c in job_id):
        raise StateError(f"job id {job_id!r} is not a hex id")
    return job_id


#: PostgreSQL's spelling of the floats Python's repr writes differently.
_PG_FLOATS = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _float_text(value: float | None) -> str:
    if value is None:
        return "NULL"
    text = repr(float(value))
    return _PG_FLOATS.get(text, text)


def _float_array(values: Sequence[float | None]) -> str:
    """A float8[] literal: repr round-trips a float exactly, and the server parses text
    faster than the driver adapts a list element by element."""
    return "{" + ",".join(map(_float_text, values)) + "}"


@functools.cache
def _unnest_epochs() -> Any:
    """SELECT unnest(:job_ids::varchar[]), unnest(:epochs::int[]), ...: the arrays bound as
    array literals (unnested side by side)."""
    from sqlalchemy import Float, Integer, String, bindparam
    from sqlalchemy import cast as sql_cast
    from sqlalchemy.dialects.postgresql import ARRAY

    def column(name: str, kind: Any) -> Any:
        return func.unnest(sql_cast(bindparam(name, type_=String), ARRAY(kind)))

    return select(
        column("job_ids", String),
        column("epochs", Integer),
        column("train_losses", Float),
        column("test_losses", Float),
        column("seconds", Float),
    )


@dataclass(frozen=True)
class Recording:
    """One claim's epochs since its last write, and the checkpoint they lead to."""

    job_id: str
    attempt: int
    rows: Sequence[EpochRow]
    checkpoint: dict[str, Any] | None


class LeaseLostError(StateError):
    """Raised when a worker's attempt no longer owns its job (taken over after its lease lapsed)."""


@dataclass(frozen=True)
class Progress:
    cancel_requested: bool


def record_epochs(
    job_id: str,
    rows: Sequence[EpochRow],
    *,
    attempt: int,
    checkpoint: dict[str, Any] | None,
    session: Session,
    lease_seconds: float,
) -> Progress:
    """Upsert a batch of epochs with the checkpoint they lead to, and renew the lease."""
    progress = _record_fenced(job_id, rows, attempt, checkpoint, session, lease_seconds)
    _upsert_epochs(job_id, rows, session)
    return progress


def _record_fenced(
    job_id: str,
    rows: Sequence[EpochRow],
    attempt: int,
    checkpoint: dict[str, Any] | None,
    session: Session,
    lease_seconds: float,
) -> Progress:
    """The job row's side of a record (progress, checkpoint, lease), behind the fence."""
    values: dict[str, Any] = {"lease_expires_at": utcnow() + dt.timedelta(seconds=lease_seconds)}
    if checkpoint is not None:
        values["checkpoint"] = json_safe(checkpoint)
    cancel = _update_fenced(job_id, attempt, rows, values, Job.cancel_requested, session)
    if cancel is None:
        raise LeaseLostError(f"job {job_id}: attempt {attempt} no longer holds it")
    return Progress(cancel_requested=bool(cancel[0]))


def record_many(
    recordings: Sequence[Recording], *, session: Session, lease_seconds: float
) -> dict[str, Progress | None]:
    """``record_epochs`` for many claims in the caller's one transaction; None: lease lost.

    A claim whose fence refuses writes nothing (its UPDATE matched no row), so the others'
    writes stand.
    """
    out: dict[str, Progress | None] = {}
    for r in recordings:
        try:
            out[r.job_id] = _record_fenced(
                r.job_id, r.rows, r.attempt, r.checkpoint, session, lease_seconds
            )
        except LeaseLostError:
            out[r.job_id] = None
    _upsert_epochs_of([(r.job_id, r.rows) for r in recordings if out[r.job_id]], session)
    return out


def finish_job(
    job_id: str,
    *,
    attempt: int,
    state: str,
    rows: Sequence[EpochRow] = (),
    result: dict[str, Any] | None = None,
    error: str | None = None,
    session: Session,
) -> None:
    """The last epochs, the result and the terminal state, in the caller's one transaction."""
    lost = finish_many([Finish(job_id, attempt, state, rows, result, error)], session=session)
    if lost:
        raise LeaseLostError(f"job {job_id}: attempt {attempt} no longer holds it")


@dataclass(frozen=True)
class Finish:
    """One claim's last epochs, result and terminal state."""

    job_id: str
    attempt: int
    state: str
    rows: Sequence[EpochRow] = ()
    result: dict[str, Any] | None = None
    error: str | None = None


def finish_many(finishes: Sequence[Finish], *, session: Session) -> list[str]:
    """``finish_job`` for many claims in the caller's one transaction; returns the job ids
    whose attempt no longer holds them (they write nothing). A succeeded job whose epoch
    rows do not add up raises StateError, which rolls the whole transaction back."""
    expected: dict[str, int] = {}
    lost: list[str] = []
    for f in finishes:
        done = _finish_fenced(f, session)
        if done is None:
            lost.append(f.job_id)
        elif f.state == "succeeded":
            expected[f.job_id] = done
    _upsert_epochs_of([(f.job_id, f.rows) for f in finishes if f.job_id not in lost], session)
    if expected:
        stored = dict(
            session.execute(
                select(Epoch.job_id, func.count())
                .where(Epoch.job_id.in_(sorted(expected)))
                .group_by(Epoch.job_id)
            ).all()
        )
        for job_id, count in expected.items():
            if stored.get(job_id, 0) != count:
                # Raising rolls the whole finish back: the job stays running and is resumed.
                raise StateError(
                    f"job {job_id}: {stored.get(job_id, 0)} epoch rows stored, {count} expected"
                )
    return lost


def _finish_fenced(f: Finish, session: Session) -> int | None:
    """The job row's side of a finish, behind the fence: its epochs_done, or None (lost)."""
    job_id, attempt, state, rows = f.job_id, f.attempt, f.state, f.rows
    result, error = f.result, f.error
    if state not in TERMINAL:
        raise StateError(f"{state!r} is not a terminal state")
    values: dict[str, Any] = {
        "state": state,
        "result": json_safe(result),
        "error": error,
        "lease_expires_at": None,
        "finished_at": utcnow(),
    }
    done = _update_fenced(job_id, attempt, rows, values, Job.epochs_done, session)
    return None if done is None else int(done[0])


def _update_fenced(
    job_id: str,
    attempt: int,
    rows: Sequence[EpochRow],
    values: dict[str, Any],
    returning: Any,
    session: Session,
) -> Any:
    """Update the job row as ``attempt`` while it still holds the job, with the progress the
    rows bring; the ``returning`` column's row, or None when the fence refused."""
    if rows:
        values = {**values, "epochs_done": rows[-1].epoch, "last_loss": rows[-1].train_loss}
    return session.execute(
        update(Job)
        .where(_fenced(job_id, attempt))
        .values(**values)
        .returning(returning)
        .execution_options(synchronize_session=False)
    ).first()


# -- cancel and retry -----------------------------------------------------------------------


def cancel_jobs(job_ids: Sequence[str], *, session: Session) -> dict[str, str]:
    """Cancel queued jobs now and ask running ones to stop; returns what happened to each."""
    outcome: dict[str, str] = {}
    now = utcnow()
    for job_id in job_ids:
        queued = session.execute(
            update(Job)
            .where((Job.id == job_id) & (Job.state == "queued"))
            .values(state="cancelled", finished_at=now, cancel_requested=True)
        )
        if queued.rowcount == 1:  # type: ignore[attr-defined]
            outcome[job_id] = "cancelled"
            continue
        running = session.execute(
            update(Job)
            .where((Job.id == job_id) & (Job.state == "running"))
            .values(cancel_requested=True)
        )
        if running.rowcount == 1:  # type: ignore[attr-defined]
            outcome[job_id] = "cancelling"
        else:
            state = session.scalar(select(Job.state).where(Job.id == job_id))
            outcome[job_id] = f"already {state}"
    return outcome


RETRYABLE = ("failed", "diverged", "cancelled")


def retry_jobs(job_ids: Sequence[str], *, session: Session) -> list[Job]:
    """Queue failed, diverged or cancelled jobs again, from scratch.

    ``attempts`` carries on counting: a worker still holding an earlier claim (paused or cut
    off) must never find its attempt number current again.
    """
    jobs = list(session.scalars(select(Job).where(Job.id.in_(job_ids))))
    refused = [j for j in jobs if j.state not in RETRYABLE]
    if refused:
        listing = ", ".join(f"{j.id[:12]} is {j.state}" for j in refused)
        raise StateError(f"only failed, diverged or cancelled jobs can be retried: {listing}")
    for job in jobs:
        session.execute(delete(Epoch).where(Epoch.job_id == job.id))
        job.state = "queued"
        job.attempts_at_retry = job.attempts
        job.epochs_done = 0
        job.last_loss = None
        job.worker = None
        job.lease_expires_at = None
        job.cancel_requested = False
        job.error = None
        job.checkpoint = None
        job.result = None
        job.published_at = None
        job.started_at = None
        job.finished_at = None
    session.flush()
    return jobs


# -- reconcile ------------------------------------------------------------------------------


@dataclass
class Reconciled:
    requeued: list[str]
    failed: list[str]


def reclaim_expired(*, session: Session) -> Reconciled:
    """Running jobs whose lease lapsed go back to queued (or fail past the attempt cap)."""
    now = utcnow()
    report = Reconciled(requeued=[], failed=[])
    expired = session.execute(
        select(Job.id, Job.attempts, Job.attempts_at_retry, Job.max_attempts).where(
            (Job.state == "running") & (Job.lease_expires_at < now)
        )
    ).all()
    for job_id, attempts, attempts_at_retry, max_attempts in expired:
        fence = (
            (Job.id == job_id)
            & (Job.state == "running")
            & (Job.attempts == attempts)
            & (Job.lease_expires_at < now)
        )
        spent = attempts - attempts_at_retry >= max_attempts
        if spent:
            values: dict[str, Any] = {
                "state": "failed",
                "error": f"worker lost: {attempts - attempts_at_retry} attempts, the limit",
                "finished_at": now,
            }
        else:
            values = {"state": "queued", "published_at": None}
        values.update(worker=None, lease_expires_at=None)
        if session.execute(update(Job).where(fence).values(**values)).rowcount == 1:  # type: ignore[attr-defined]
            (report.failed if spent else report.requeued).append(job_id)
    return report


def jobs_to_publish(
    *, session: Session, held: set[str] | None, grace_seconds: float = 10.0
) -> list[tuple[str, str]]:
    """Queued jobs that need a message: never published (or reclaimed), or — when the broker's
    contents are known — published over ``grace_seconds`` ago and no longer held by it.

    A packing sweep's queued job is carried by any message of its sweep that the broker
    holds (whoever takes it claims the sweep's next queued jobs), so it needs none of its own.
    """
    condition: ColumnElement[bool] = Job.published_at.is_(None)
    if held is not None:
        cutoff = utcnow() - dt.timedelta(seconds=grace_seconds)
        condition = or_(condition, Job.published_at < cutoff)
    rows = session.execute(
        select(Job.id, Job.queue, Job.published_at, Job.sweep_id, Sweep.pack)
        .outerjoin(Sweep, Sweep.id == Job.sweep_id)
        .where((Job.state == "queued") & condition)
    ).all()
    carried: set[str] = set()
    if held:
        packing = {row.sweep_id for row in rows if row.pack and row.published_at is not None}
        if packing:
            members = session.execute(
                select(Job.id, Job.sweep_id).where(Job.sweep_id.in_(sorted(packing)))
            ).all()
            carried = {str(sweep_id) for job_id, sweep_id in members if job_id in held}
    return [
        (row.id, row.queue)
        for row in rows
        if row.published_at is None
        or held is None
        or (row.id not in held and not (row.pack and row.sweep_id in carried))
    ]


# -- queries --------------------------------------------------------------------------------


def resolve_ids(refs: Iterable[str], *, session: Session) -> list[str]:
    """Full job ids from ids or unique prefixes (as git resolves short hashes)."""
    out: list[str] = []
    for ref in refs:
        ref = ref.strip().lower()
        if not ref or not all(c in "0123456789abcdef" for c in ref):
            raise NotFoundError(f"job id {ref!r}: not a hex id or prefix")
        matches = session.scalars(
            select(Job.id).where(Job.id.startswith(ref, autoescape=True)).limit(2)
        ).all()
        if not matches:
            raise NotFoundError(f"job id {ref!r}: no such job")
        if len(matches) > 1:
            raise NotFoundError(f"job id {ref!r}: ambiguous, give more characters")
        out.append(matches[0])
    return list(dict.fromkeys(out))


def resolve_sweep(ref: str, *, session: Session) -> str:
    ref = ref.strip().lower()
    matches = session.scalars(
        select(Sweep.id).where(Sweep.id.startswith(ref, autoescape=True)).limit(2)
    ).all()
    if len(matches) != 1:
        raise NotFoundError(
            f"sweep id {ref!r}: " + ("no such sweep" if not matches else "ambiguous")
        )
    return matches[0]


def find_jobs(
    *,
    session: Session,
    ids: Sequence[str] | None = None,
    state: str | None = None,
    sweep_id: str | None = None,
    name: str | None = None,
    limit: int | None = None,
) -> list[Job]:
    """Jobs by ids, state, sweep or name, oldest first."""
    query = select(Job)
    if ids is not None:
        query = query.where(Job.id.in_(ids))
    if state is not None:
        query = query.where(Job.state == state)
    if sweep_id is not None:
        query = query.where(Job.sweep_id == sweep_id)
    if name is not None:
        query = query.where(Job.name == name)
    query = query.order_by(Job.created_at, Job.id)
    if limit is not None:
        query = query.order_by(None).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
        return list(reversed(session.scalars(query).all()))
    return list(session.scalars(query))


#: The summary fields a results row carries, in order.
SUMMARY_FIELDS = (
    "epochs_done",
    "train_loss",
    "best_loss",
    "final_loss",
    "test_loss",
    "r2",
    "test_r2",
    "optimum_loss",
    "optimum_gap",
    "coef_error",
    "weights",
    "bias",
    "train_seconds",
    "device",
    "engine",
)


def result_row(job: Job | Row[Any]) -> dict[str, Any]:
    """One job (an ORM object or a row of ``RESULT_COLUMNS``) as a flat row: identity, state,
    the spec's parameters and the summary."""
    from service.spec import flatten

    row: dict[str, Any] = {
        "id": job.id,
        "name": job.name,
        "sweep_id": job.sweep_id,
        "state": job.state,
        "attempts": job.attempts,
        "error": job.error,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
    }
    summary = job.result or {}
    for key in SUMMARY_FIELDS:
        row[key] = summary.get(key)
    # The pack it trained in (a packing sweep's jobs train together): its id and size.
    pack = summary.get("pack") or {}
    row["pack_id"], row["pack_size"] = pack.get("id"), pack.get("size")
    row["epochs_done"] = job.epochs_done
    row.update({f"spec.{k}": v for k, v in flatten(job.spec).items()})
    return row


def results_frame(jobs: Sequence[Job | Row[Any]]) -> pd.DataFrame:
    """One row per job: spec parameters flattened into columns, and the summary."""
    import pandas as pd

    return pd.DataFrame([result_row(job) for job in jobs])


#: The columns a results row is made of, read without an ORM object per job.
RESULT_COLUMNS = (
    Job.id,
    Job.name,
    Job.sweep_id,
    Job.state,
    Job.attempts,
    Job.error,
    Job.created_at,
    Job.started_at,
    Job.finished_at,
    Job.epochs_done,
    Job.result,
    Job.spec,
)


def results_frame_of(job_ids: Sequence[str], *, session: Session) -> pd.DataFrame:
    """The results frame of many jobs (oldest first) from one query of plain rows."""
    rows = session.execute(
        select(*RESULT_COLUMNS).where(Job.id.in_(job_ids)).order_by(Job.created_at, Job.id)
    ).all()
    return results_frame(rows)


def history_rows(job_ids: Sequence[str], *, session: Session) -> list[Epoch]:
    """Every epoch of many jobs in one query, ordered by job then epoch."""
    if not job_ids:
        return []
    return list(
        session.scalars(
            select(Epoch).where(Epoch.job_id.in_(job_ids)).order_by(Epoch.job_id, Epoch.epoch)
        )
    )


#: Epoch rows fetched per round trip when a history is built into a frame.
HISTORY_CHUNK = 20_000


def history_frame(job_ids: Sequence[str], *, session: Session) -> pd.DataFrame:
    """Long format (job_id, epoch, train_loss, test_loss, seconds) for many jobs at once."""
    import numpy as np
    import pandas as pd

    columns = ["job_id", "epoch", "train_loss", "test_loss", "seconds"]
    if not job_ids:
        return pd.DataFrame(columns=columns)
    # Streamed in chunks straight into arrays: an ORM object per row held about 1.7 KB, and
    # each row's job id points at one shared string rather than a fresh copy.
    shared = {job_id: job_id for job_id in job_ids}
    parts: list[list[Any]] = [[] for _ in columns]
    result = session.execute(
        select(Epoch.job_id, Epoch.epoch, Epoch.train_loss, Epoch.test_loss, Epoch.seconds)
        .where(Epoch.job_id.in_(job_ids))
        .order_by(Epoch.job_id, Epoch.epoch)
        .execution_options(yield_per=HISTORY_CHUNK)
    )
    for chunk in result.partitions():
        ids, epochs, train, test, seconds = zip(*chunk, strict=True)
        parts[0].append(np.array([shared[i] for i in ids], dtype=object))
        parts[1].append(np.array(epochs, dtype=np.int64))
        parts[2].append(np.array(train, dtype=np.float64))
        parts[3].append(np.array(test, dtype=np.float64))  # None (no test set) becomes NaN
        parts[4].append(np.array(seconds, dtype=np.float64))
    if not parts[0]:
        return pd.DataFrame(columns=columns)
    return pd.DataFrame(
        {name: np.concatenate(chunks) for name, chunks in zip(columns, parts, strict=True)}
    )


def queue_counts(*, session: Session) -> dict[str, int]:
    """Jobs per state."""
    return {
        state: count
        for state, count in session.execute(select(Job.state, func.count()).group_by(Job.state))
    }
