"""The Celery task: claim, load data, run the engine, record, finish. Thin glue."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from billiard.exceptions import SoftTimeLimitExceeded, WorkerLostError
from celery import Celery, signals
from celery.worker.request import Request
from sqlalchemy import exc as sa_exc

from service import db, jobs
from service.dispatch import publish_jobs, reconcile_once
from service.errors import BrokerError, DataError, LrqError, StateError
from service.models import Dataset, Job
from service.settings import Settings
from service.spec import JobSpec
from workers.engines.base import Checkpoint, EpochRecord, RunResult
from workers.monitor import configure_logging, register_info_command

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The longest pause between a worker's tries to reach the database.
DB_RETRY_MAX_PAUSE = 5.0
_TRANSIENT = (sa_exc.OperationalError, sa_exc.InterfaceError)

#: Sent by the worker's main process to its pool processes when it begins a warm shutdown:
#: a running job checkpoints, goes back to the queue and its process returns at once. A
#: real-time signal: billiard points SIGUSR1/SIGUSR2 and the other classic ones at its own
#: exit handler in every pool process after its set-up hooks have run, so a handler for them
#: installed there would be replaced and the signal would kill the process mid-job.
RELEASE_SIGNAL = signal.SIGRTMIN + 1
#: Set (in a pool process) once the worker is shutting down.
shutdown_requested = threading.Event()
#: Set (in the worker's main process) when Ctrl-C started its shutdown.
interrupted = threading.Event()


#: When the running task's soft time limit falls due (monotonic), per thread that runs tasks.
_soft_limit = threading.local()


def _start_soft_limit(settings: Settings) -> None:
    limit = settings.soft_time_limit
    _soft_limit.due = time.monotonic() + limit if limit > 0 else None


def _check_soft_limit() -> None:
    """Raise the soft time limit at a chunk boundary once it is due.

    Celery's signal raises it wherever the task happens to be, which is most of the time
    enough; but an exception raised inside a weakref callback or a ``__del__`` (the database
    layer runs many) is printed and dropped by Python, and the task then runs on to the hard
    limit and loses its process. This check makes the soft limit land in the task's own code.
    """
    due = getattr(_soft_limit, "due", None)
    if due is not None and time.monotonic() >= due:
        raise SoftTimeLimitExceeded()


def with_db_retries(action: Callable[[], T], *, what: str) -> T:
    """Run a database action, retrying through a restarting or unreachable database."""
    # No deadline: an outage, however long, is never the job's fault, and giving up could
    # only fail it. Retrying is safe meanwhile: once the lease lapses a reclaim may hand the
    # job to another worker, and this attempt's next write is then refused by the fence.
    pause = 0.25
    while True:
        try:
            return action()
        except _TRANSIENT as exc:
            log.warning(
                "%s: database unavailable (%s); retrying in %gs", what, type(exc).__name__, pause
            )
            time.sleep(pause)
            pause = min(pause * 2, DB_RETRY_MAX_PAUSE)


class Recorder:
    """Buffers epochs and writes them with a checkpoint every N epochs or T seconds."""

    def __init__(self, claim: jobs.Claim, settings: Settings) -> None:
        self.claim = claim
        self.settings = settings
        self.url = settings.resolved_database_url()
        self.pending: list[jobs.EpochRow] = []
        self.last_flush = time.monotonic()
        self.cancel_requested = False
        self.lease_lost = False
        #: The worker is shutting down and this attempt's last epoch is recorded with a
        #: checkpoint: the run stops and the job goes back to the queue.
        self.released = False

    def on_epoch(self, record: EpochRecord, snapshot: Callable[[], Checkpoint]) -> None:
        if self.released:
            return  # the checkpoint is written; a later epoch is run again on resume
        self.pending.append(
            jobs.EpochRow(record.epoch, record.train_loss, record.test_loss, record.seconds)
        )
        due = len(self.pending) >= self.settings.record_every_epochs or (
            time.monotonic() - self.last_flush >= self.settings.record_every_seconds
        )
        if shutdown_requested.is_set():
            self.flush(snapshot())
            self.released = not self.lease_lost
        elif due:
            self.flush(snapshot())

    def flush(self, checkpoint: Checkpoint | None) -> None:
        rows = list(self.pending)

        def write() -> jobs.Progress:
            with db.transaction(self.url) as session:
                return jobs.record_epochs(
                    self.claim.job_id,
                    rows,
                    attempt=self.claim.attempt,
                    checkpoint=checkpoint,
                    session=session,
                    lease_seconds=self.settings.lease_seconds,
                )

        try:
            progress = with_db_retries(write, what=f"job {self.claim.job_id}: record")
        except jobs.LeaseLostError:
            self.lease_lost = True
            return
        self.pending.clear()
        self.last_flush = time.monotonic()
        self.cancel_requested = progress.cancel_requested

    def should_stop(self) -> bool:
        _check_soft_limit()
        return self.cancel_requested or self.lease_lost or self.released


class LeaseKeeper(threading.Thread):
    """Renews the lease while an epoch runs longer than the lease would last."""

    def __init__(self, claim: jobs.Claim, settings: Settings, recorder: Recorder) -> None:
        super().__init__(name=f"lease-{claim.job_id[:8]}", daemon=True)
        self.claim, self.settings, self.recorder = claim, settings, recorder
        self.stopped = threading.Event()

    def run(self) -> None:
        url = self.settings.resolved_database_url()
        while not self.stopped.wait(self.settings.lease_seconds / 3):
            try:
                with db.transaction(url) as session:
                    held = jobs.renew_lease(
                        self.claim.job_id,
                        attempt=self.claim.attempt,
                        session=session,
                        lease_seconds=self.settings.lease_seconds,
                    )
            except _TRANSIENT:
                continue  # the next renewal tries again; the recorder retries its own writes
            if not held:
                self.recorder.lease_lost = True
                return


def load_train_data(spec: JobSpec, dataset_id: str | None, settings: Settings) -> Any:
    """The spec's arrays: synthetic draws, or a registered dataset read from the database."""
    from service.datasets import Table, decode
    from workers.data import build_train_data

    if spec.data.path is not None:
        # Workers never read files: submit registers them, so a path here is refused.
        raise DataError("data.path: a worker reads registered datasets only; submit the spec")
    if spec.data.synthetic is not None:
        return build_train_data(spec)
    if dataset_id is None:
        raise DataError("data.dataset: the job names no registered dataset")

    def fetch() -> bytes | None:
        with db.transaction(settings.resolved_database_url()) as session:
            dataset = session.get(Dataset, dataset_id)
            return None if dataset is None else dataset.content

    blob = with_db_retries(fetch, what=f"dataset {dataset_id[:12]}: load")
    if blob is None:
        raise DataError(f"data.dataset: {dataset_id} is not in the database")
    table = decode(blob)
    features = spec.data.features or table.columns
    index = [table.columns.index(name) for name in features]
    table = Table(columns=list(features), target=table.target, x=table.x[:, index], y=table.y)
    return build_train_data(spec, table=table)


def execute_job(job_id: str, settings: Settings) -> str:
    """Run one job to a terminal state (or give it up to a reclaim); returns the outcome."""
    _start_soft_limit(settings)
    url = settings.resolved_database_url()

    def claim_it() -> jobs.Claim | None:
        with db.transaction(url) as session:
            return jobs.claim_job(
                job_id,
                session=session,
                worker=jobs.worker_identity(),
                lease_seconds=settings.lease_seconds,
            )

    claim = with_db_retries(claim_it, what=f"job {job_id}: claim")
    if claim is None:
        carry_pack(job_id, settings)
        return "skipped"
    siblings = claim_pack_siblings(claim, settings)
    if siblings:
        return execute_pack([claim, *siblings], settings)
    return run_claimed(claim, settings)


def run_claimed(claim: jobs.Claim, settings: Settings) -> str:
    """Train one claimed job to a terminal state (or give it up to a reclaim)."""
    from workers import engines

    job_id = claim.job_id
    url = settings.resolved_database_url()
    recorder = Recorder(claim, settings)
    keeper = LeaseKeeper(claim, settings, recorder)
    keeper.start()
    state, error, result = "failed", None, None
    unreachable = False
    try:
        spec = JobSpec.model_validate(claim.spec)
        data = load_train_data(spec, claim.dataset_id, settings)
        run: RunResult = engines.train(
            spec,
            data,
            on_epoch=recorder.on_epoch,
            should_stop=recorder.should_stop,
            resume=claim.checkpoint,
            # The engine advances a recording interval at a time.
            chunk_epochs=settings.record_every_epochs,
            chunk_seconds=settings.record_every_seconds,
        )
        state, result = run.status, run.summary
    except SoftTimeLimitExceeded:
        error = f"timed out: the soft time limit of {settings.soft_time_limit:g}s"
    except LrqError as exc:
        error = str(exc)
    except _TRANSIENT as exc:
        if isinstance(exc.orig, SoftTimeLimitExceeded):
            error = f"timed out: the soft time limit of {settings.soft_time_limit:g}s"
        else:
            # An infrastructure fault, not the job's: leave it to its lease, to be resumed.
            log.warning("job %s: database unavailable (%s); leaving it", job_id, exc.orig)
            unreachable = True
    except Exception as exc:
        if isinstance(getattr(exc, "orig", None), SoftTimeLimitExceeded):
            # The limit landed inside a statement (a record), and SQLAlchemy wrapped it.
            error = f"timed out: the soft time limit of {settings.soft_time_limit:g}s"
        else:
            log.exception("job %s failed", job_id)
            error = f"{type(exc).__name__}: {exc}"
    finally:
        keeper.stopped.set()
    if recorder.lease_lost:
        log.warning("job %s: attempt %d lost its lease; stopping", job_id, claim.attempt)
        return "lease lost"
    if unreachable:
        return "database unavailable"
    if recorder.released and state == "cancelled" and not recorder.cancel_requested:
        return release_for_shutdown(claim, settings)

    def finish() -> None:
        with db.transaction(url) as session:
            jobs.finish_job(
                job_id,
                attempt=claim.attempt,
                state=state,
                rows=recorder.pending,
                result=result,
                error=error,
                session=session,
            )

    try:
        with_db_retries(finish, what=f"job {job_id}: finish")
    except jobs.LeaseLostError:
        return "lease lost"
    return state


# -- packs ----------------------------------------------------------------------------------

_TIMED_OUT = "timed out: the soft time limit of {:g}s"


def _pack_spec(claim: jobs.Claim) -> JobSpec | None:
    """The claim's spec when it may run in a pack (the fused engine would run it)."""
    from workers.engines import _cuda_possible
    from workers.engines.pack import packable

    try:
        spec = JobSpec.model_validate(claim.spec)
    except (LrqError, ValueError):
        return None
    return spec if packable(spec, cuda=_cuda_possible(spec)) else None


def carry_pack(job_id: str, settings: Settings) -> None:
    """A message whose job is already taken carries, in a packing sweep, the sweep's next
    pack: claim its queued jobs that share the named job's data, and train them."""
    if settings.pack_max_members < 2:
        return

    def look() -> jobs.Claim | None:
        with db.transaction(settings.resolved_database_url()) as session:
            return jobs.pack_carrier(job_id, session=session)

    named = with_db_retries(look, what=f"job {job_id}: its sweep")
    if named is None:
        return
    claims = claim_pack_siblings(named, settings, with_lead=True)
    if not claims:
        return
    log.info("job %s: its message carries %d queued job(s) of its sweep", job_id, len(claims))
    outcome = (
        run_claimed(claims[0], settings) if len(claims) == 1 else execute_pack(claims, settings)
    )
    if outcome == "released":
        # Handed back at a warm shutdown: the lead keeps its published mark, so it needs a
        # message now (the others were marked for the reconciler).
        from service.queue import get_app

        _republish(get_app(), settings, claims[0].job_id)


def claim_pack_siblings(
    claim: jobs.Claim, settings: Settings, *, with_lead: bool = False
) -> list[jobs.Claim]:
    """Claim the queued jobs of ``claim``'s packing sweep that can train with it, exactly.

    ``with_lead``: ``claim`` is not held (its job is taken), so claim one more, to lead. A
    full pack with more of the sweep left queued sends one more message, to carry the next.
    """
    from service.packing import data_key
    from workers.engines.pack import member_bytes

    if not claim.packs or settings.pack_max_members < 2:
        return []  # alone, or its sweep does not pack: no siblings to ask the database for
    spec = _pack_spec(claim)
    if spec is None:
        return []
    key = data_key(claim.spec, claim.dataset_id)
    synthetic = spec.data.synthetic
    features = synthetic.n_features if synthetic is not None else len(spec.data.features or [1])
    each = member_bytes(spec, features, settings.record_every_epochs)
    room = min(settings.pack_max_members, settings.pack_max_bytes // each) - (0 if with_lead else 1)

    def fits(raw: dict[str, Any], dataset_id: str | None) -> bool:
        if data_key(raw, dataset_id) != key:
            return False
        sibling = jobs.Claim("", 0, raw, None, dataset_id)
        return _pack_spec(sibling) is not None

    def claim_them() -> tuple[list[jobs.Claim], bool]:
        with db.transaction(settings.resolved_database_url()) as session:
            return jobs.claim_siblings(
                claim.job_id,
                session=session,
                worker=jobs.worker_identity(),
                lease_seconds=settings.lease_seconds,
                limit=room,
                fits=fits,
            )

    if room < 1:
        return []
    claims, more = with_db_retries(claim_them, what=f"job {claim.job_id}: claim its pack")
    if more and claims:
        _send_carrier(claim.job_id, settings)
    return claims


def _send_carrier(job_id: str, settings: Settings) -> None:
    """One more message of ``job_id``'s sweep: whoever takes it claims the next pack."""
    from sqlalchemy import select

    from service.queue import get_app, publish

    def queue_of() -> str | None:
        with db.transaction(settings.resolved_database_url()) as session:
            queue = session.scalar(select(Job.queue).where(Job.id == job_id))
            return None if queue is None else str(queue)

    try:
        queue = with_db_retries(queue_of, what=f"job {job_id}: its queue")
        if queue is not None:
            publish(get_app(), [(job_id, queue)], timeout=settings.broker_timeout)
    except (BrokerError, *_TRANSIENT) as exc:
        log.warning("job %s: no message sent for the rest of its sweep (%s)", job_id, exc)


class MemberRecorder:
    """One pack member's unwritten epochs, its latest snapshot and what the database said."""

    def __init__(self, claim: jobs.Claim) -> None:
        self.claim = claim
        self.pending: list[jobs.EpochRow] = []
        self.snapshot: Callable[[], Checkpoint] | None = None
        self.cancel_requested = False
        self.lease_lost = False
        self.released = False
        self.done = False

    def on_epoch(self, record: EpochRecord, snapshot: Callable[[], Checkpoint]) -> None:
        if self.released or self.lease_lost:
            return
        self.pending.append(
            jobs.EpochRow(record.epoch, record.train_loss, record.test_loss, record.seconds)
        )
        self.snapshot = snapshot

    def should_stop(self) -> bool:
        _check_soft_limit()
        return self.cancel_requested or self.lease_lost or self.released


class PackRecorder:
    """Writes a whole pack's epochs and checkpoints in one transaction per flush."""

    def __init__(self, claims: list[jobs.Claim], settings: Settings) -> None:
        self.settings = settings
        self.url = settings.resolved_database_url()
        self.members = {c.job_id: MemberRecorder(c) for c in claims}
        self.first = claims[0].job_id
        self.last_flush = time.monotonic()
        self.outcomes: dict[str, str] = {}

    def live(self) -> list[MemberRecorder]:
        return [m for m in self.members.values() if not (m.done or m.lease_lost)]

    def after_chunk(self, finished: dict[str, RunResult], running: list[str]) -> None:
        self.finish_all([(job_id, run.status, run.summary) for job_id, run in finished.items()])
        members = [self.members[job_id] for job_id in running]
        due = any(len(m.pending) >= self.settings.record_every_epochs for m in members) or (
            time.monotonic() - self.last_flush >= self.settings.record_every_seconds
        )
        if shutdown_requested.is_set():
            self.flush(members)
            for member in members:
                member.released = not member.lease_lost
        elif due:
            self.flush(members)

    def flush(self, members: list[MemberRecorder]) -> None:
        members = [m for m in members if not (m.done or m.lease_lost or m.released)]
        recordings = [
            jobs.Recording(
                m.claim.job_id,
                m.claim.attempt,
                list(m.pending),
                None if m.snapshot is None else m.snapshot(),
            )
            for m in members
        ]
        if not recordings:
            return

        def write() -> dict[str, jobs.Progress | None]:
            with db.transaction(self.url) as session:
                return jobs.record_many(
                    recordings, session=session, lease_seconds=self.settings.lease_seconds
                )

        progress = with_db_retries(write, what=f"pack of {len(recordings)}: record")
        for member in members:
            seen = progress[member.claim.job_id]
            if seen is None:
                member.lease_lost = True
                self.outcomes[member.claim.job_id] = "lease lost"
                continue
            member.pending.clear()
            member.cancel_requested = seen.cancel_requested
        self.last_flush = time.monotonic()

    def finish_all(self, done: list[tuple[str, str, dict[str, Any] | None]]) -> None:
        """Finish the members that stopped in a chunk, in one transaction; one that cannot
        (its epoch rows do not add up) makes them finish one by one."""
        members = [self.members[job_id] for job_id, _, _ in done]
        handing_back = any(m.released for m in members)
        if handing_back or len(done) < 2:
            for job_id, state, result in done:
                self.finish(job_id, state, result, None)
            return
        finishes = [
            jobs.Finish(
                job_id,
                self.members[job_id].claim.attempt,
                state,
                self.members[job_id].pending,
                result,
            )
            for job_id, state, result in done
            if not (self.members[job_id].done or self.members[job_id].lease_lost)
        ]
        if not finishes:
            return

        def write() -> list[str]:
            with db.transaction(self.url) as session:
                return jobs.finish_many(finishes, session=session)

        try:
            lost = with_db_retries(write, what=f"pack of {len(finishes)}: finish")
        except StateError:
            for job_id, state, result in done:
                self.finish(job_id, state, result, None)
            return
        for f in finishes:
            self.members[f.job_id].done = True
            self.outcomes[f.job_id] = "lease lost" if f.job_id in lost else f.state

    def finish(
        self, job_id: str, state: str, result: dict[str, Any] | None, error: str | None
    ) -> None:
        """Finish one member (or hand it back if the worker is shutting down)."""
        member = self.members[job_id]
        if member.done or member.lease_lost:
            return
        member.done = True
        if member.released and state == "cancelled" and not member.cancel_requested:
            # Only the message's job gets its message sent again at once; the reconciler
            # sends the others'.
            self.outcomes[job_id] = release_for_shutdown(
                member.claim, self.settings, unpublished=job_id != self.first
            )
            return

        def write() -> None:
            with db.transaction(self.url) as session:
                jobs.finish_job(
                    job_id,
                    attempt=member.claim.attempt,
                    state=state,
                    rows=member.pending,
                    result=result,
                    error=error,
                    session=session,
                )

        try:
            with_db_retries(write, what=f"job {job_id}: finish")
        except jobs.LeaseLostError:
            self.outcomes[job_id] = "lease lost"
            return
        except StateError as exc:
            # Refused (e.g. an epoch row missing): the job stays running, its lease lapses
            # and it resumes from its checkpoint; the other members carry on.
            log.error("job %s: not finished (%s); left to be resumed", job_id, exc)
            self.outcomes[job_id] = "not finished"
            return
        self.outcomes[job_id] = state


class PackLeaseKeeper(threading.Thread):
    """Renews every live member's lease in one transaction."""

    def __init__(self, recorder: PackRecorder) -> None:
        super().__init__(name="lease-pack", daemon=True)
        self.recorder = recorder
        self.stopped = threading.Event()

    def run(self) -> None:
        settings = self.recorder.settings
        while not self.stopped.wait(settings.lease_seconds / 3):
            members = {m.claim.job_id: m for m in self.recorder.live()}
            held = [(m.claim.job_id, m.claim.attempt) for m in members.values()]
            try:
                with db.transaction(self.recorder.url) as session:
                    lost = jobs.renew_leases(
                        held, session=session, lease_seconds=settings.lease_seconds
                    )
            except _TRANSIENT:
                continue
            for job_id in lost:
                members[job_id].lease_lost = True


def execute_pack(claims: list[jobs.Claim], settings: Settings) -> str:
    """Run the claimed jobs of one sweep as a pack; returns the first (the message's) outcome."""
    from workers.engines import _cuda_possible
    from workers.engines.pack import Member, pack_place, train_pack

    first = claims[0].job_id
    pack_info = {"id": jobs.new_id(), "size": len(claims)}
    recorder = PackRecorder(claims, settings)
    keeper = PackLeaseKeeper(recorder)
    keeper.start()
    log.info("job %s: running in pack %s with %d jobs", first, pack_info["id"], len(claims))
    error: str | None = None
    unreachable = False
    try:
        members: list[Member] = []
        for claim in claims:
            member = recorder.members[claim.job_id]
            try:
                spec = JobSpec.model_validate(claim.spec)
            except ValueError as exc:
                recorder.finish(claim.job_id, "failed", None, f"spec: {exc}")
                continue
            members.append(
                Member(claim.job_id, spec, claim.checkpoint, member.on_epoch, member.should_stop)
            )
        if members:
            lead = members[0].spec
            data = load_train_data(lead, claims[0].dataset_id, settings)
            device = None
            if pack_place(lead, cuda=_cuda_possible(lead)) == "device":
                from workers.engines.torch_engine import resolve_device

                device = resolve_device(lead.device)  # a CUDA pack: stacked tensors there

            def after_chunk(finished: dict[str, RunResult], running: list[str]) -> None:
                for run in finished.values():
                    run.summary["pack"] = pack_info
                recorder.after_chunk(finished, running)

            packed = train_pack(
                members,
                data,
                chunk_epochs=settings.record_every_epochs,
                chunk_seconds=settings.record_every_seconds,
                after_chunk=after_chunk,
                device=device,
            )
            for job_id, message in packed.errors.items():
                recorder.finish(job_id, "failed", None, message)
            for run in packed.results.values():
                run.summary["pack"] = pack_info
            recorder.finish_all(
                [(job_id, run.status, run.summary) for job_id, run in packed.results.items()]
            )
    except SoftTimeLimitExceeded:
        error = _TIMED_OUT.format(settings.soft_time_limit)
    except LrqError as exc:
        error = str(exc)
    except _TRANSIENT as exc:
        if isinstance(exc.orig, SoftTimeLimitExceeded):
            error = _TIMED_OUT.format(settings.soft_time_limit)
        else:
            log.warning("pack %s: database unavailable (%s); leaving it", pack_info["id"], exc)
            unreachable = True
    except Exception as exc:
        if isinstance(getattr(exc, "orig", None), SoftTimeLimitExceeded):
            error = _TIMED_OUT.format(settings.soft_time_limit)
        else:
            log.exception("pack %s failed", pack_info["id"])
            error = f"{type(exc).__name__}: {exc}"
    finally:
        keeper.stopped.set()
    if unreachable:
        return "database unavailable"
    if error is not None:
        for member in recorder.live():
            recorder.finish(member.claim.job_id, "failed", None, error)
    return recorder.outcomes.get(first, "lease lost")


def release_for_shutdown(
    claim: jobs.Claim, settings: Settings, *, unpublished: bool = False
) -> str:
    """Put a job this process checkpointed at shutdown back to queued; returns "released".

    ``unpublished``: its message is spent (a pack member's), so the reconciler sends one.
    """

    def release() -> bool:
        with db.transaction(settings.resolved_database_url()) as session:
            return jobs.hand_back_job(
                claim.job_id, attempt=claim.attempt, session=session, unpublished=unpublished
            )

    if not with_db_retries(release, what=f"job {claim.job_id}: release"):
        return "lease lost"
    log.info("job %s: checkpointed and released for the worker's shutdown", claim.job_id)
    return "released"


# -- Celery glue ----------------------------------------------------------------------------


class JobNotSucceededError(Exception):
    """The task's outcome when its job failed, diverged, was cancelled or lost its lease."""


def _job_id(request: Request) -> str | None:
    try:
        args = request.args
        return str(args[0]) if args else None
    except Exception:  # a malformed message: it names no job
        return None


def _republish(app: Celery, settings: Settings, job_id: str) -> None:
    """Send a released job's message now; the reconciler sends it if this fails."""

    def queue_of() -> str | None:
        with db.transaction(settings.resolved_database_url()) as session:
            job = session.get(Job, job_id)
            return job.queue if job is not None and job.state == "queued" else None

    try:
        queue = with_db_retries(queue_of, what=f"job {job_id}: republish")
        if queue is not None:
            publish_jobs(app, settings, [(job_id, queue)])
    except (BrokerError, *_TRANSIENT) as exc:
        log.warning("job %s: not republished (%s); the reconciler will", job_id, exc)


def _request_release(*_: Any) -> None:
    shutdown_requested.set()


_torch_threads_set = threading.Event()


def _limit_torch_threads(threads: int) -> None:
    """Cap torch's threads in this process, once, at its first job (importing torch takes
    seconds on a busy host: too long for a new pool process's start-up)."""
    if threads and not _torch_threads_set.is_set():
        _torch_threads_set.set()
        import torch

        # Pool processes each taking every core slow each other down many times over.
        torch.set_num_threads(threads)


class JobRequest(Request):  # type: ignore[misc]
    """Runs in the worker's main process: it sees a pool process die or overrun its time."""

    settings: Settings

    def _holder(self) -> str:
        return f"{socket.gethostname()}:{self.worker_pid}"

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        job_id = _job_id(self)
        if soft or job_id is None:
            return
        url = self.settings.resolved_database_url()
        # Everything the killed process held: a pack's members as well as this message's job.
        with db.transaction(url) as session:
            jobs.fail_held(
                self._holder(),
                error=f"timed out: the hard time limit of {timeout:g}s",
                session=session,
            )

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        exc = getattr(exc_info.exception, "exc", exc_info.exception)
        job_id = _job_id(self)
        if isinstance(exc, WorkerLostError | SystemExit) and job_id and self.worker_pid:
            # The process holding the leases is gone: free its jobs now (all of a pack's, found
            # by holder), not when the leases lapse, so that they can be claimed at once.
            with db.transaction(self.settings.resolved_database_url()) as session:
                jobs.release_held(self._holder(), session=session)
        return super().on_failure(exc_info, send_failed_event, return_ok)


_reconciler_started = threading.Event()
#: The Celery workers started in this process (their pools hold the job processes).
workers_here: list[Any] = []


def pool_pids(worker: Any) -> list[int]:
    """Pids of a Celery worker's pool processes (none for a pool without processes)."""
    pool = getattr(getattr(worker, "pool", None), "_pool", None)
    return [int(p.pid) for p in getattr(pool, "_pool", None) or [] if p.pid]


def start_reconciler(app: Celery, settings: Settings) -> threading.Thread:
    """A daemon thread in the worker's main process running reconcile passes."""

    def loop() -> None:
        while True:
            try:
                reconcile_once(app, settings)
            except Exception as exc:  # the broker or database is down: try next pass
                log.warning("reconcile pass failed: %s", exc)
            time.sleep(settings.reconcile_interval)

    thread = threading.Thread(target=loop, name="lrq-reconciler", daemon=True)
    thread.start()
    return thread


def register_tasks(
    app: Celery, settings: Settings, *, reconcile: bool = True, torch_threads: int = 0
) -> None:
    """Attach the job task (and the worker's process hooks) to an app."""
    request_class = type("BoundJobRequest", (JobRequest,), {"settings": settings})

    @app.task(
        name="lrq.run_job",
        bind=True,
        Request=request_class,
        acks_late=True,
        throws=(JobNotSucceededError,),  # an outcome, logged without a traceback
    )  # type: ignore[untyped-decorator]
    def run_job(self: Any, job_id: str) -> dict[str, str]:
        _limit_torch_threads(torch_threads)
        outcome = execute_job(str(job_id), settings)
        if outcome == "released":
            _republish(app, settings, str(job_id))
        elif outcome not in ("succeeded", "skipped"):
            # Celery and Flower must not count a failed, diverged or cancelled job a success.
            raise JobNotSucceededError(f"job {job_id}: {outcome}")
        return {"job_id": str(job_id), "outcome": outcome}

    register_info_command()

    @signals.after_setup_logger.connect(weak=False)  # type: ignore[untyped-decorator]
    @signals.after_setup_task_logger.connect(weak=False)  # type: ignore[untyped-decorator]
    def _log_format(logger: logging.Logger, **_: Any) -> None:
        configure_logging(logger, settings.log_format)

    @signals.worker_process_init.connect(weak=False)  # type: ignore[untyped-decorator]
    def _fresh_process(**_: Any) -> None:
        db.dispose_all(close=False)  # never reuse a pool inherited across fork
        shutdown_requested.clear()
        signal.signal(RELEASE_SIGNAL, _request_release)

    @signals.worker_init.connect(weak=False)  # type: ignore[untyped-decorator]
    def _main_process(sender: Any, **_: Any) -> None:
        workers_here.append(sender)
        if threading.current_thread() is threading.main_thread():
            # Inherited by each pool process from its fork, so that the signal cannot kill
            # one that has not yet run its own set-up.
            signal.signal(RELEASE_SIGNAL, _request_release)

    @signals.worker_shutting_down.connect(weak=False)  # type: ignore[untyped-decorator]
    def _release_running_jobs(sig: str = "", **_: Any) -> None:
        if sig == "SIGINT":
            interrupted.set()
        # Celery's warm shutdown waits for running jobs, which may take hours: have each
        # pool process checkpoint its job and hand it back instead.
        for worker in workers_here:
            for pid in pool_pids(worker):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, RELEASE_SIGNAL)

    if reconcile:

        @signals.worker_ready.connect(weak=False)  # type: ignore[untyped-decorator]
        def _reconcile(**_: Any) -> None:
            if not _reconciler_started.is_set():
                _reconciler_started.set()
                start_reconciler(app, settings)
