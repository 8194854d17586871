"""The broker and the database fail under running workers and at submit."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.faults.conftest import (
    Cluster,
    Forwarder,
    PrivatePostgres,
    elapsed,
    report_recovery,
    training_spec,
)
from tests.support import DEADLINE_SCALE, RedisServer

pytestmark = pytest.mark.faults


@pytest.fixture
def own_redis(tmp_path: Path) -> RedisServer:
    """A Redis of this test's own, without persistence (as RedisServer starts it)."""
    return RedisServer(tmp_path / "own-redis")


@pytest.mark.parametrize("fault", ["restart", "flushall"])
def test_broker_losing_its_messages_is_reconciled(
    make_cluster: Callable[..., Cluster], pg_url: str, own_redis: RedisServer, fault: str
) -> None:
    own_redis.start()
    try:
        cluster = make_cluster(pg_url, own_redis.url)
        worker = cluster.start_worker("a")
        specs = [training_spec(f"broker-{fault}-{i}", epochs=10_000) for i in range(3)]
        job_ids = [cluster.submit(spec) for spec in specs]
        cluster.wait_running(job_ids[0], epochs=50)
        if fault == "restart":
            own_redis.stop()
            own_redis.start()
        else:
            own_redis.client().flushall()
        faulted_at = time.monotonic()
        assert own_redis.client().llen("cpu") == 0

        for job_id in job_ids:
            cluster.wait_finished(job_id, timeout=120)
        report_recovery(f"Redis {fault} -> all 3 jobs succeeded", elapsed(faulted_at))
        for job_id, spec in zip(job_ids, specs, strict=True):
            cluster.assert_as_uninterrupted(job_id, spec)
        assert worker.process.poll() is None, "the same worker went on consuming"
    finally:
        own_redis.stop()


def test_submit_with_the_broker_down_fails_clearly_and_the_job_runs_later(
    make_cluster: Callable[..., Cluster], sqlite_url: str, own_redis: RedisServer
) -> None:
    password = "s3cret-pw"
    broker = f"redis://:{password}@127.0.0.1:{own_redis.port}/0"
    cluster = make_cluster(sqlite_url, broker)
    spec = training_spec("broker-down-at-submit", epochs=200)
    path = cluster.tmp / "spec.json"
    path.write_text(json.dumps(spec))

    def lrq(*args: str) -> subprocess.CompletedProcess[str]:
        # A hang fails here, through the timeout, rather than through a timed assertion.
        return subprocess.run(
            [sys.executable, "-m", "service.cli", *args],
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=60 * DEADLINE_SCALE,
            check=False,
        )

    submitted = lrq("submit", str(path), "-q")
    assert submitted.returncode != 0
    assert f"broker redis://:***@127.0.0.1:{own_redis.port}/0 unreachable" in submitted.stderr
    assert password not in submitted.stderr + submitted.stdout
    assert "recorded" in submitted.stderr
    (job_id,) = submitted.stdout.split()
    job = cluster.job(job_id)
    assert (job.state, job.published_at) == ("queued", None)

    own_redis.start()
    try:
        own_redis.client().config_set("requirepass", password)
        reconciled = lrq("reconcile")
        assert reconciled.returncode == 0, reconciled.stderr
        assert "published 1" in reconciled.stdout
        cluster.start_worker("a")
        cluster.wait_finished(job_id)
        cluster.assert_as_uninterrupted(job_id, spec)
    finally:
        own_redis.stop()


@pytest.mark.parametrize("outage", ["restart", "proxy-cut"])
def test_database_outage_while_recording(
    make_cluster: Callable[..., Cluster],
    redis_url: str,
    request: pytest.FixtureRequest,
    forwarders: Callable[..., Forwarder],
    outage: str,
) -> None:
    """PostgreSQL restarted (a private instance) or every connection to it cut at a proxy."""
    if outage == "restart":
        server: PrivatePostgres = request.getfixturevalue("private_postgres")
        cluster = make_cluster(server.url, redis_url)
    else:
        pg_url: str = request.getfixturevalue("pg_url")
        real = make_url(pg_url)
        proxy = forwarders((real.host or "127.0.0.1", real.port or 5432))
        cluster = make_cluster(
            real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False),
            redis_url,
        )
        cluster.inspect_url = pg_url
    spec = training_spec(f"database-{outage}", epochs=20_000)
    cluster.start_worker("a")
    job_id = cluster.submit(spec)
    cluster.wait_running(job_id, epochs=100)
    if outage == "restart":
        server.stop("fast")
        time.sleep(3)
        server.start()
    else:
        proxy.cut()
        time.sleep(3)
        proxy.resume()

    job = cluster.wait_finished(job_id)
    assert "database unavailable" in cluster.logs()
    cluster.assert_as_uninterrupted(job_id, spec)
    assert job.attempts <= 2
    print(f"\ndatabase {outage}: attempts {job.attempts}")


#: Longer than the 120 s after which a worker used to give up its writes and fail the job.
LONG_OUTAGE_SECONDS = 130


def test_a_database_outage_longer_than_any_retry_window_fails_no_job(
    make_cluster: Callable[..., Cluster],
    pg_url: str,
    redis_url: str,
    forwarders: Callable[..., Forwarder],
) -> None:
    """Every connection to PostgreSQL cut at a proxy for over two minutes under a running job.
    The lease outlasts the cut, so no reclaim can rescue the job: only the worker's own
    retrying can, and the job must end as if nothing happened, on its first attempt."""
    real = make_url(pg_url)
    proxy = forwarders((real.host or "127.0.0.1", real.port or 5432))
    cluster = make_cluster(
        real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False),
        redis_url,
    )
    cluster.inspect_url = pg_url
    spec = training_spec("database-long-outage", epochs=20_000)
    cluster.start_worker("a", env={"LRQ_LEASE_SECONDS": str(LONG_OUTAGE_SECONDS * 3)})
    job_id = cluster.submit(spec)
    cluster.wait_running(job_id, epochs=100)
    proxy.cut()
    cut_at = time.monotonic()
    time.sleep(LONG_OUTAGE_SECONDS)
    proxy.resume()
    resumed_at = time.monotonic()

    job = cluster.wait_finished(job_id)
    report_recovery(f"{elapsed(cut_at):.0f}s database cut -> succeeded", elapsed(resumed_at))
    assert "database unavailable" in cluster.logs()
    cluster.assert_as_uninterrupted(job_id, spec)
    assert (job.attempts, job.error) == (1, None)


def test_a_worker_cut_off_inside_a_transaction_does_not_block_the_reclaim(
    pg_cluster: Cluster,
) -> None:
    """A partitioned worker's open transaction (its job's row locked, the server unaware that
    the client is gone) is ended by the server, so the reconciler reclaims the job."""
    from sqlalchemy import update

    from service import db, jobs
    from service.models import Job

    cluster = pg_cluster
    job_id = cluster.submit(training_spec("orphaned-transaction", epochs=100))
    with db.transaction(cluster.url) as session:
        claim = jobs.claim_job(job_id, session=session, worker="gone:1", lease_seconds=1)
    assert claim is not None
    orphan = db.sessionmaker_for(cluster.url, worker=True)()
    orphan.begin()
    orphan.execute(update(Job).where(Job.id == job_id).values(last_loss=1.0))
    time.sleep(1.5)  # the lease lapses while the row stays locked

    reconciled = subprocess.run(
        [sys.executable, "-m", "service.cli", "reconcile"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60 * DEADLINE_SCALE,
        check=False,
    )
    assert reconciled.returncode == 0, reconciled.stderr
    assert "requeued 1" in reconciled.stdout
    job = cluster.job(job_id)
    assert (job.state, job.worker, job.published_at is not None) == ("queued", None, True)
    with pytest.raises(Exception, match="idle-in-transaction"):
        orphan.commit()
    orphan.close()
