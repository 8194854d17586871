"""Getting recorded jobs onto the broker: after submit and retry, and by the reconciler.

The database is the truth; a message only wakes a worker. A job whose publish failed stays
queued with no ``published_at`` and the next reconciler pass sends it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from celery import Celery

from service import db, jobs
from service.errors import BrokerError
from service.packing import Queued, carriers
from service.queue import held_job_ids, publish
from service.settings import Settings

log = logging.getLogger(__name__)


def publish_jobs(
    app: Celery,
    settings: Settings,
    pairs: Sequence[tuple[str, str]],
    *,
    covered: Sequence[str] = (),
) -> None:
    """Publish (job id, queue) pairs, then stamp them published, with the ``covered`` jobs
    their messages carry (a packing sweep's); BrokerError leaves them all recorded for the
    reconciler."""
    publish(app, pairs, timeout=settings.broker_timeout)
    with db.transaction(settings.resolved_database_url()) as session:
        jobs.mark_published([*(job_id for job_id, _ in pairs), *covered], session=session)


def publish_submitted(
    app: Celery, settings: Settings, submitted: Sequence[Queued], *, pack: bool
) -> int:
    """Publish a submit's jobs: a packing sweep's by its carriers only. Returns the messages."""
    pairs = carriers(submitted, pack=pack, max_members=settings.pack_max_members)
    sent = {job_id for job_id, _ in pairs}
    publish_jobs(app, settings, pairs, covered=[q.id for q in submitted if q.id not in sent])
    return len(pairs)


@dataclass
class ReconcileReport:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    published: list[str] = field(default_factory=list)


def reconcile_once(app: Celery, settings: Settings) -> ReconcileReport:
    """Reclaim lapsed leases, then publish queued jobs the broker does not hold."""
    url = settings.resolved_database_url()
    with db.transaction(url) as session:
        reclaimed = jobs.reclaim_expired(session=session)
    report = ReconcileReport(requeued=reclaimed.requeued, failed=reclaimed.failed)
    try:
        held = held_job_ids(app, stale_after=2 * settings.lease_seconds)
    except Exception as exc:
        raise BrokerError(f"cannot read the broker's queues: {type(exc).__name__}") from None
    with db.transaction(url) as session:
        pending = jobs.jobs_to_publish(session=session, held=held)
    if pending:
        publish_jobs(app, settings, pending)
        report.published = [job_id for job_id, _ in pending]
    if report.requeued or report.failed or report.published:
        log.info(
            "reconciled: %d requeued, %d failed, %d published",
            len(report.requeued),
            len(report.failed),
            len(report.published),
        )
    return report
