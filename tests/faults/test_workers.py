"""Workers that die, hang, overrun or are told to stop, and messages delivered twice."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from service.queue import get_app, publish
from tests.faults.conftest import KILLER, Cluster, elapsed, report_recovery, training_spec
from tests.support import DEADLINE_SCALE, run_cli

pytestmark = pytest.mark.faults


def holder_of(cluster: Cluster, job_id: str) -> int:
    """The index of the worker whose pool process holds the job's lease."""
    job = cluster.wait_running(job_id)
    pid = int(job.worker.rpartition(":")[2])
    (index,) = [i for i, w in enumerate(cluster.workers) if pid in w.pool_pids()]
    return index


def test_pool_process_killed_mid_run_resumes_from_its_checkpoint(sqlite_cluster: Cluster) -> None:
    cluster = sqlite_cluster
    spec = training_spec(
        "pool-killed", epochs=20_000, backend="torch", n_samples=1000, batch_size=50
    )
    worker = cluster.start_worker("a")
    job_id = cluster.submit(spec)
    cluster.wait_running(job_id, epochs=50, timeout=90)
    (pool_pid,) = worker.pool_pids()
    os.kill(pool_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    killed_after = cluster.job(job_id).epochs_done

    job = cluster.wait_finished(job_id)
    report_recovery("pool process SIGKILLed -> job succeeded", elapsed(killed_at))
    assert job.attempts == 2
    assert killed_after < spec["epochs"]
    assert worker.process.poll() is None, "the worker's main process survives"
    assert pool_pid not in worker.pool_pids()
    cluster.assert_as_uninterrupted(job_id, spec)


def test_whole_worker_killed_the_other_finishes_after_the_lease(pg_cluster: Cluster) -> None:
    cluster = pg_cluster
    spec = training_spec("worker-killed", epochs=20_000)
    cluster.start_worker("a")
    cluster.start_worker("b")
    job_id = cluster.submit(spec)
    dead = holder_of(cluster, job_id)
    cluster.wait_running(job_id, epochs=100)
    cluster.workers[dead].kill(signal.SIGKILL)
    killed_at = time.monotonic()

    job = cluster.wait_finished(job_id, timeout=120)
    report_recovery("whole worker SIGKILLed -> other worker succeeded", elapsed(killed_at))
    assert job.attempts == 2
    survivor = cluster.workers[1 - dead]
    assert survivor.process.poll() is None
    assert int(job.worker.rpartition(":")[2]) in survivor.pool_pids()
    cluster.assert_as_uninterrupted(job_id, spec)


def test_job_that_kills_its_worker_fails_at_the_attempt_cap_and_the_queue_drains(
    sqlite_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = sqlite_cluster
    monkeypatch.setenv("LRQ_MAX_ATTEMPTS", "2")
    worker = cluster.start_worker("a", command=KILLER)
    doomed = cluster.submit(training_spec("kill-me-always", epochs=5000))
    after = training_spec("after-the-killer", epochs=300)
    normal = cluster.submit(after)

    failed = cluster.wait_finished(doomed)
    assert failed.state == "failed"
    assert failed.error.startswith("worker lost"), failed.error
    assert failed.attempts == 2
    assert failed.epochs_done < 5000
    assert worker.text().count("exited with 'signal 9 (SIGKILL)'") == 2
    cluster.wait_finished(normal)
    cluster.assert_as_uninterrupted(normal, after)
    assert cluster.job(normal).attempts == 1
    assert worker.process.poll() is None


#: Celery's line for a task that returned: its result names the job and lrq's outcome.
OUTCOME = r"lrq.run_job\[(\w+)\] succeeded in [\d.]+s: \{'job_id': '\1', 'outcome': '(\w+)'\}"


def test_a_message_delivered_twice_runs_the_job_once(sqlite_cluster: Cluster) -> None:
    cluster = sqlite_cluster
    spec = training_spec("delivered-twice", epochs=800)
    job_id = cluster.submit(spec)
    publish(get_app(), [(job_id, "cpu")], timeout=2)  # the same id, a second message
    worker = cluster.start_worker("a", concurrency=2)

    cluster.wait_finished(job_id)
    cluster.assert_as_uninterrupted(job_id, spec)
    assert cluster.job(job_id).attempts == 1
    cluster.wait(
        lambda: len(re.findall(OUTCOME, worker.text())) == 2,
        timeout=30,
        what="both messages handled",
    )
    outcomes = re.findall(OUTCOME, worker.text())
    assert sorted(outcomes) == [(job_id, "skipped"), (job_id, "succeeded")]


def test_hard_time_limit_fails_the_job_and_replaces_the_pool_process(
    sqlite_cluster: Cluster,
) -> None:
    """A task stuck in C code (its soft-limit signal pending) is killed at the hard limit;
    one that sees the soft limit fails with it and keeps its process."""
    cluster = sqlite_cluster
    # Recording every epoch keeps the job in the database layer much of the time, where the
    # soft limit's exception may arrive wrapped by SQLAlchemy. A fresh pool process's first
    # job imports torch and loads numba's kernels, seconds on a busy host: the soft limit
    # leaves room for it to train first, and the hard one is well past the soft one.
    limits = {"LRQ_SOFT_TIME_LIMIT": "8", "LRQ_TIME_LIMIT": "20", "LRQ_RECORD_EVERY_EPOCHS": "1"}
    worker = cluster.start_worker("a", command=KILLER, env=limits)
    stuck = cluster.submit(training_spec("hang-in-c", epochs=5000))
    cluster.wait_job(stuck, lambda j: j.state == "running", timeout=30, what="running")
    (first_pool,) = worker.pool_pids()

    job = cluster.wait_finished(stuck, timeout=60)
    assert job.state == "failed"
    assert job.error == "timed out: the hard time limit of 20s"
    cluster.wait(lambda: worker.pool_pids() not in ([], [first_pool]), timeout=30,
                 what="a new pool process")  # fmt: skip
    assert worker.process.poll() is None

    slow = cluster.submit(training_spec("past-soft-limit", epochs=1_000_000))
    job = cluster.wait_finished(slow, timeout=60)
    assert job.state == "failed"
    assert job.error == "timed out: the soft time limit of 8s"
    assert 0 < job.epochs_done < 1_000_000

    after = training_spec("after-the-limits", epochs=200)
    normal = cluster.submit(after)
    cluster.wait_finished(normal)
    cluster.assert_as_uninterrupted(normal, after)
    assert worker.process.poll() is None


@pytest.mark.parametrize("target", ["main-process", "process-group"])
def test_sigterm_mid_job_loses_nothing(sqlite_cluster: Cluster, target: str) -> None:
    """A deploy's SIGTERM: to the main process (docker stop) or every process of the worker
    (systemd's default); the job is finished there or goes back and a new worker finishes it."""
    cluster = sqlite_cluster
    spec = training_spec(f"sigterm-{target}", epochs=20_000)
    old = cluster.start_worker("old")
    job_id = cluster.submit(spec)
    cluster.wait_running(job_id, epochs=100)
    if target == "main-process":
        old.process.send_signal(signal.SIGTERM)
    else:
        old.kill(signal.SIGTERM)
    try:
        old.process.wait(60 * DEADLINE_SCALE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not exit after SIGTERM\n{cluster.logs()}")

    cluster.start_worker("new")
    job = cluster.wait_finished(job_id)
    cluster.assert_as_uninterrupted(job_id, spec)
    print(f"\nSIGTERM to the {target}: attempts {job.attempts}")


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_a_stopped_worker_hands_its_running_job_back_at_once(
    sqlite_cluster: Cluster, stop: str
) -> None:
    """Ctrl-C typed in the worker's terminal, or SIGTERM to its main process (docker stop):
    the running job checkpoints and goes back to the queue instead of being waited for."""
    cluster = sqlite_cluster
    spec = training_spec(f"stopped-by-{stop}", epochs=20_000, n_samples=800)
    old = cluster.start_terminal_worker("old")
    job_id = cluster.submit(spec)
    cluster.wait_running(job_id, epochs=200, timeout=120)
    if stop == "ctrl-c":
        old.type_ctrl_c()
    else:
        old.process.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()

    job = cluster.wait_job(
        job_id, lambda j: j.state != "running", timeout=120, what="handed back by the worker"
    )
    report_recovery(f"{stop} -> job back in the queue", elapsed(stopped_at))
    assert (job.state, job.worker, job.lease_expires_at) == ("queued", None, None)
    assert 0 < job.epochs_done < spec["epochs"]
    assert job.checkpoint["epoch"] == job.epochs_done
    try:
        code = old.process.wait(120 * DEADLINE_SCALE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not exit after {stop}\n{cluster.logs()}")
    report_recovery(f"{stop} -> worker exited", elapsed(stopped_at))
    # Handed back by the pool process itself, which lived to say so: not a lost process's
    # job freed by its parent.
    log = old.text()
    assert f"job {job_id}: checkpointed and released for the worker's shutdown" in log, log
    assert "exited with" not in log, log
    assert code == (130 if stop == "ctrl-c" else 0), log
    (line,) = [row for row in run_cli("status").output.splitlines() if row.startswith(job_id[:12])]
    assert " queued " in line, line

    cluster.start_worker("new")
    cluster.wait_finished(job_id, timeout=300)
    cluster.assert_as_uninterrupted(job_id, spec)


def test_a_second_ctrl_c_stops_the_worker_and_the_job_still_finishes(
    sqlite_cluster: Cluster,
) -> None:
    cluster = sqlite_cluster
    spec = training_spec("ctrl-c-twice", epochs=20_000, n_samples=800)
    old = cluster.start_terminal_worker("old")
    job_id = cluster.submit(spec)
    cluster.wait_running(job_id, epochs=200, timeout=120)
    old.type_ctrl_c()
    old.type_ctrl_c()
    try:
        old.process.wait(120 * DEADLINE_SCALE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not exit after a second Ctrl-C\n{cluster.logs()}")

    cluster.start_worker("new")
    cluster.wait_finished(job_id, timeout=300)
    cluster.assert_as_uninterrupted(job_id, spec)


@contextlib.contextmanager
def busy_cores(processes: int) -> Iterator[None]:
    """Busy-loop processes that keep every core of the host loaded."""
    # Each in a session of its own: with the kernel's autogroup scheduling a session shares
    # the CPU as one, as a busy host's separate services and users would.
    loops = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
        for _ in range(processes)
    ]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
        for loop in loops:
            loop.wait(30)


def test_a_replacement_pool_process_comes_up_on_a_busy_host(sqlite_cluster: Cluster) -> None:
    cluster = sqlite_cluster
    worker = cluster.start_worker("a")
    (first,) = worker.pool_pids()
    spec = training_spec("on-a-busy-host", epochs=30, backend="torch", n_samples=400)
    with busy_cores(4 * (os.cpu_count() or 1)):
        os.kill(first, signal.SIGKILL)
        job_id = cluster.submit(spec)
        cluster.wait_finished(job_id, timeout=300)
    cluster.assert_as_uninterrupted(job_id, spec)
    assert "Timed out waiting for UP message" not in worker.text()
    assert worker.process.poll() is None
    assert first not in worker.pool_pids()


def test_a_worker_that_stops_on_an_error_exits_non_zero(sqlite_cluster: Cluster) -> None:
    """A supervisor restarts a worker that fails; Celery's own exit code was lost (0)."""
    cluster = sqlite_cluster
    broken = (sys.executable, "-m", "tests.faults.broken_consumer", "worker")
    worker = cluster.start_worker("a", command=broken, ready=False)
    cluster.submit(training_spec("wakes-the-consumer", epochs=10))
    try:
        code = worker.process.wait(120 * DEADLINE_SCALE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the broken worker did not stop\n{cluster.logs()}")
    assert "Unrecoverable error" in worker.text()
    assert code != 0
