"""Packed sweeps on real workers: a pool process or a whole worker killed mid-pack, a member
cancelled, members of different lengths; every member ends as its solo run."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Mapping
from typing import Any

import pytest

from tests.faults.conftest import Cluster, training_spec
from tests.support import run_cli

pytestmark = pytest.mark.faults

LRS = ("0.001", "0.002", "0.003", "0.004")


def submit_sweep(cluster: Cluster, spec: Mapping[str, Any], *options: str) -> list[str]:
    path = cluster.tmp / f"spec-{spec['name']}.json"
    path.write_text(json.dumps(spec))
    result = run_cli("submit", str(path), "-q", *options)
    assert result.exit_code == 0, result.output
    return [line for line in result.output.splitlines() if not line.startswith("#")]


def member_spec(cluster: Cluster, job_id: str) -> dict[str, Any]:
    spec: dict[str, Any] = cluster.job(job_id).spec
    return spec


def wait_packed(cluster: Cluster, ids: list[str], *, epochs: int) -> str:
    """The holder of every member, once all run in one pack with ``epochs`` recorded."""

    def packed() -> str | None:
        found = [cluster.job(i) for i in ids]
        holders = {j.worker for j in found}
        running = all(j.state == "running" and j.epochs_done >= epochs for j in found)
        return holders.pop() if running and len(holders) == 1 else None

    def detail() -> str:
        seen = [cluster.job(i) for i in ids]
        return "".join(f"\n{j.id[:12]} {j.state} {j.worker} {j.epochs_done}" for j in seen)

    holder: str = cluster.wait(
        packed, timeout=120, what=f"{len(ids)} jobs running in one pack", detail=detail
    )
    return holder


def assert_members_as_solo(cluster: Cluster, ids: list[str]) -> None:
    for job_id in ids:
        cluster.wait_finished(job_id, timeout=180)
    for job_id in ids:
        cluster.assert_as_uninterrupted(job_id, member_spec(cluster, job_id))


def test_a_pool_process_killed_mid_pack_leaves_every_member_as_its_solo_run(
    sqlite_cluster: Cluster,
) -> None:
    cluster = sqlite_cluster
    spec = training_spec("pack-pool-killed", epochs=600, n_samples=1000, batch_size=50)
    worker = cluster.start_worker("a")
    ids = submit_sweep(cluster, spec, "--grid", f"optimizer.lr={','.join(LRS)}")
    assert len(ids) == len(LRS)
    wait_packed(cluster, ids, epochs=50)
    (pool_pid,) = worker.pool_pids()
    os.kill(pool_pid, signal.SIGKILL)

    assert_members_as_solo(cluster, ids)
    jobs = [cluster.job(i) for i in ids]
    assert all(j.attempts == 2 for j in jobs), [j.attempts for j in jobs]
    assert {j.result["pack"]["size"] for j in jobs} == {len(ids)}
    assert len({j.result["pack"]["id"] for j in jobs}) == 1, "resumed together, in a new pack"


def test_a_whole_worker_killed_mid_pack_the_other_resumes_every_member(
    pg_cluster: Cluster,
) -> None:
    cluster = pg_cluster
    # Long enough that the pack is still running once the second worker is up (seconds on a
    # busy host) and the kill lands mid-pack.
    spec = training_spec("pack-worker-killed", epochs=40_000)
    cluster.start_worker("a")
    ids = submit_sweep(cluster, spec, "--grid", f"optimizer.lr={','.join(LRS)}")
    holder = wait_packed(cluster, ids, epochs=100)
    # The second worker starts once the first holds the whole sweep.
    survivor = cluster.start_worker("b")
    assert int(holder.rpartition(":")[2]) in cluster.workers[0].pool_pids()
    cluster.workers[0].kill(signal.SIGKILL)
    cut = [cluster.job(i) for i in ids]
    assert all(j.state == "running" and j.epochs_done < spec["epochs"] for j in cut), [
        (j.state, j.epochs_done) for j in cut
    ]

    assert_members_as_solo(cluster, ids)
    for job_id in ids:
        job = cluster.job(job_id)
        assert job.attempts == 2
        assert int(job.worker.rpartition(":")[2]) in survivor.pool_pids()


def test_members_cancel_and_finish_alone(sqlite_cluster: Cluster) -> None:
    cluster = sqlite_cluster
    spec = training_spec("pack-lengths", epochs=100, n_samples=1000, batch_size=50)
    cluster.start_worker("a")
    ids = submit_sweep(cluster, spec, "--grid", "epochs=100,400,1000000")
    short, medium, long = ids
    holder = cluster.wait_running(long, epochs=20).worker
    for job_id in (short, medium):
        assert cluster.wait_finished(job_id).state == "succeeded"
    assert cluster.job(long).state == "running" and cluster.job(long).worker == holder
    result = run_cli("cancel", long)
    assert result.exit_code == 0, result.output
    assert cluster.wait_finished(long).state == "cancelled"
    assert_members_as_solo(cluster, [short, medium])
    packs = {cluster.job(i).result["pack"]["id"] for i in ids}
    assert len(packs) == 1 and cluster.job(long).result["pack"]["size"] == 3
    done = cluster.job(long).epochs_done
    assert 0 < done < 1000000
    assert [e for e, _, _ in cluster.history(long)] == list(range(1, done + 1))


def test_no_pack_runs_each_member_alone(sqlite_cluster: Cluster) -> None:
    cluster = sqlite_cluster
    spec = training_spec("pack-off", epochs=60, n_samples=1000, batch_size=50)
    cluster.start_worker("a")
    ids = submit_sweep(cluster, spec, "--grid", "optimizer.lr=0.001,0.002", "--no-pack")
    assert_members_as_solo(cluster, ids)
    assert all("pack" not in cluster.job(i).result for i in ids)


def test_a_carried_pack_handed_back_at_shutdown_gets_one_message_at_once(
    sqlite_cluster: Cluster,
) -> None:
    """A message whose job is taken carries its sweep's next pack; a warm shutdown hands that
    pack back with a message for its lead at once and the rest marked for the reconciler."""
    import redis

    from service.queue import _job_id_of

    cluster = sqlite_cluster
    spec = training_spec("pack-carried", epochs=20_000, n_samples=1000, batch_size=50)
    ids = submit_sweep(cluster, spec, "--grid", f"optimizer.lr={','.join(LRS)}")
    broker = redis.Redis.from_url(cluster.env["LRQ_BROKER_URL"])
    (carrier,) = [_job_id_of(raw) for raw in broker.lrange("cpu", 0, -1)]
    assert carrier in ids
    # The carrier's own job is cancelled before any worker runs: its message carries the rest.
    assert run_cli("cancel", carrier).exit_code == 0
    rest = [i for i in ids if i != carrier]
    old = cluster.start_worker("old")
    holder = wait_packed(cluster, rest, epochs=100)
    assert int(holder.rpartition(":")[2]) in old.pool_pids()
    old.process.send_signal(signal.SIGTERM)
    old.process.wait(120)
    back = [cluster.job(i) for i in rest]
    assert {j.state for j in back} == {"queued"}
    assert all(0 < j.epochs_done < spec["epochs"] for j in back)

    # Each member has one message: the pack's lead its own, sent as it was handed back (it
    # kept its published mark), the others from the reconciler, which they were marked for.
    def waiting() -> list[str | None]:
        return sorted(_job_id_of(raw) for raw in broker.lrange("cpu", 0, -1))

    cluster.wait(lambda: waiting() == sorted(rest), timeout=60, what="a message for each member")
    cluster.start_worker("new")
    assert_members_as_solo(cluster, rest)
    assert cluster.job(carrier).state == "cancelled"
