"""The queue end to end: `lrq submit` through Redis (or the filesystem broker) to real worker
processes, with the jobs recorded in PostgreSQL and SQLite."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    DEADLINE_SCALE,
    WorkerProcess,
    epoch_losses,
    load_jobs,
    run_cli,
    submit_ids,
    wait_for,
    wait_jobs,
)

ROOT = Path(__file__).resolve().parents[2]
TORCH_SPEC = str(ROOT / "examples" / "tutorial_torch.yaml")
NUMPY_SPEC = str(ROOT / "examples" / "tutorial_numpy.yaml")
SWEEP_SPEC = str(ROOT / "examples" / "sweep.yaml")
STATUS_HEADER = ["ID", "NAME", "BACKEND", "DEVICE", "STATE", "EPOCH", "LAST_LOSS", "WORKER", "AGE"]
#: The sweep example made long enough to cancel while it runs: 235 batches an epoch, 400 epochs,
#: on the reference loop (the fused engine would finish before it could be seen running).
LONG = ("--set", "data.synthetic.n_samples=40000", "--set", "epochs=400", "--set", "engine=loop")


@contextmanager
def worker(env: dict[str, str], log: Path, **options: Any) -> Iterator[WorkerProcess]:
    process = WorkerProcess(env, log, **options)
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@functools.cache
def lrq_run(spec: str, *overrides: str) -> dict[str, Any]:
    """What `lrq run SPEC --json` prints: the summary and the per-epoch history."""
    result = run_cli("run", spec, *overrides, "--json")
    assert result.exit_code == 0, result.output
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def assert_fresh_history(url: str, job: Any, epochs: int) -> list[float]:
    """Epochs 1..epochs stored once each; returns their train losses."""
    rows = epoch_losses(url, job.id)
    assert [epoch for epoch, _ in rows] == list(range(1, epochs + 1)), job.id
    return [loss for _, loss in rows]


def cli_process(
    *args: str, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """`lrq ARGS` as its own process, as a user in another terminal runs it."""
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout * DEADLINE_SCALE,
        check=False,
    )


def test_tutorial_jobs_give_the_histories_of_lrq_run(
    lrq_env: dict[str, str], tmp_path: Path
) -> None:
    url = lrq_env["LRQ_DATABASE_URL"]
    expected = {"tutorial-torch": lrq_run(TORCH_SPEC), "tutorial-numpy": lrq_run(NUMPY_SPEC)}
    with worker(lrq_env, tmp_path / "worker.log") as process:
        ids = submit_ids(TORCH_SPEC)
        waited = run_cli("submit", NUMPY_SPEC, "--wait", "--timeout", "120", "-q")
        assert waited.exit_code == 0, waited.output + process.text()[-3000:]
        ids += waited.stdout.split()
        found = wait_jobs(url, ids, timeout=60, workers=[process])
    assert sorted(job.name for job in found) == ["tutorial-numpy", "tutorial-torch"]
    for job in found:
        run = expected[job.name]
        assert (job.state, job.attempts, job.error) == ("succeeded", 1, None)
        assert job.epochs_done == job.epochs_total == len(run["history"])
        assert assert_fresh_history(url, job, job.epochs_total) == run["history"]
        for key in ("weights", "bias", "final_loss", "train_loss", "test_loss", "optimum_loss"):
            assert job.result[key] == run[key], key


def test_sweep_of_twenty_jobs_over_two_workers(lrq_env: dict[str, str], tmp_path: Path) -> None:
    url = lrq_env["LRQ_DATABASE_URL"]
    grid = ("--grid", "optimizer.lr=1e-3,2e-3,5e-3,1e-2,2e-2", "--grid", "batch_size=32,64,128,256")
    with ExitStack() as stack:
        processes = [
            stack.enter_context(worker(lrq_env, tmp_path / f"{name}.log", name=f"{name}@%h"))
            for name in ("lrq-a", "lrq-b")
        ]
        ids = submit_ids(SWEEP_SPEC, "--set", "epochs=8", *grid)
        assert len(ids) == 20
        found = wait_jobs(url, ids, timeout=120, workers=processes)
        pool_pids = {pid for process in processes for pid in process.pool_pids()}
    assert {job.state for job in found} == {"succeeded"}
    assert {job.attempts for job in found} == {1}
    assert len({job.sweep_id for job in found}) == 1
    points = {(job.spec["optimizer"]["lr"], job.spec["batch_size"]) for job in found}
    assert len(points) == 20
    for job in found:
        assert_fresh_history(url, job, 8)
    assert {int(job.worker.rpartition(":")[2]) for job in found} <= pool_pids
    [sample] = [j for j in found if (j.spec["optimizer"]["lr"], j.spec["batch_size"]) == (1e-2, 64)]
    point = ("--set", "optimizer.lr=1e-2", "--set", "batch_size=64")
    expected = lrq_run(SWEEP_SPEC, "--set", "epochs=8", *point)
    assert assert_fresh_history(url, sample, 8) == expected["history"]


def test_cancel_retry_and_wait_exit_codes(lrq_env: dict[str, str], tmp_path: Path) -> None:
    url = lrq_env["LRQ_DATABASE_URL"]
    # Cancelled while queued, before any worker runs: it never starts.
    [queued] = submit_ids(SWEEP_SPEC, "--set", "epochs=5")
    cancelled = run_cli("cancel", queued[:10])
    assert cancelled.exit_code == 0, cancelled.output
    assert cancelled.stdout.split() == [queued[:12], "cancelled"]
    with worker(lrq_env, tmp_path / "worker.log") as process:
        wait_for(lambda: "'skipped'" in process.text(), timeout=30, what="the message skipped")
        [job] = load_jobs(url, [queued])
        assert (job.state, job.attempts, job.started_at) == ("cancelled", 0, None)
        assert job.epochs_done == 0
        assert epoch_losses(url, queued) == []

        # --wait gives up at --timeout with exit 1; the job goes on.
        timed = run_cli("submit", SWEEP_SPEC, *LONG, "--wait", "--timeout", "0.5", "-q")
        assert timed.exit_code == 1
        assert "still unfinished" in timed.stderr
        [long] = timed.stdout.split()
        # Cancelled while running: it stops at its next record and ends cancelled.
        wait_jobs(url, [long], timeout=30, states=["running"], workers=[process])
        stopping = run_cli("cancel", long[:8])
        assert stopping.exit_code == 0, stopping.output
        assert stopping.stdout.split() == [long[:12], "cancelling"]
        [job] = wait_jobs(url, [long], timeout=30, workers=[process])
        assert (job.state, job.error) == ("cancelled", None)
        assert 0 < job.epochs_done < 400
        before = assert_fresh_history(url, job, job.epochs_done)
        again = run_cli("cancel", long)
        assert again.stdout.split() == [long[:12], "already", "cancelled"]

        # Retried: queued again from scratch, each succeeds with a whole new history.
        retried = run_cli("retry", long[:12], queued)
        assert retried.exit_code == 0, retried.output
        assert sorted(retried.stdout.splitlines()) == sorted(
            f"{job_id[:12]}  queued" for job_id in (long, queued)
        )
        found = wait_jobs(url, [long, queued], timeout=90, workers=[process])
        # One claim each since the retry; attempt numbers carry on from before it.
        since_retry = [(j.state, j.attempts - j.attempts_at_retry, j.error) for j in found]
        assert since_retry == [("succeeded", 1, None)] * 2
        assert {j.id: j.attempts for j in found} == {long: 2, queued: 1}
        after = assert_fresh_history(url, load_jobs(url, [long])[0], 400)
        assert after[: len(before)] == before
        assert_fresh_history(url, load_jobs(url, [queued])[0], 5)
        refused = run_cli("retry", queued)  # succeeded: retrying it is bad input
        assert refused.exit_code == 2
        assert "only failed, diverged or cancelled jobs can be retried" in refused.stderr

        # --wait: 0 when every job succeeded, 1 when one diverged.
        ok = run_cli(
            "submit",
            SWEEP_SPEC,
            "--set",
            "epochs=5",
            "--wait",
            f"--timeout={60 * DEADLINE_SCALE:g}",
        )
        assert ok.exit_code == 0, ok.output
        assert ok.stdout.splitlines()[-1].endswith("succeeded")
        huge_lr = ("--grid", "optimizer.lr=1e-3,1e6")
        bad = run_cli(
            "submit",
            SWEEP_SPEC,
            "--set",
            "epochs=20",
            *huge_lr,
            "--wait",
            f"--timeout={60 * DEADLINE_SCALE:g}",
        )
        assert bad.exit_code == 1, bad.output
        outcomes = sorted(line.split()[1] for line in bad.stdout.splitlines()[-2:])
        assert outcomes == ["diverged", "succeeded"]


def test_a_packed_sweep_travels_as_one_message_a_pack(
    lrq_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    from service.packing import data_key

    url = lrq_env["LRQ_DATABASE_URL"]
    lrs = ["0.001", "0.002", "0.003", "0.005", "0.008", "0.01", "0.02", "0.03", "0.05", "0.08"]
    broker = redis.Redis.from_url(lrq_env["LRQ_BROKER_URL"])
    # Submitted with packs of 4: one message for each pack's worth, every job marked sent.
    monkeypatch.setenv("LRQ_PACK_MAX_MEMBERS", "4")
    ids = submit_ids(SWEEP_SPEC, "--set", "epochs=8", "--grid", "optimizer.lr=" + ",".join(lrs))
    assert broker.llen("cpu") == 3
    assert all(job.published_at is not None for job in load_jobs(url, ids))
    # The worker takes packs of 2: the three messages carry five packs between them, each
    # full pack with more of the sweep queued sending the next one on (no reconciler here).
    env = {**lrq_env, "LRQ_PACK_MAX_MEMBERS": "2", "LRQ_RECONCILE_INTERVAL": "3600"}
    with worker(env, tmp_path / "worker.log") as process:
        found = wait_jobs(url, ids, timeout=120, workers=[process])
        # A message sent on by the last full pack may find nothing left: it is dropped.
        wait_for(lambda: broker.llen("cpu") == 0, timeout=60, what="the queue drained")
    assert [job.state for job in found] == ["succeeded"] * len(ids)
    assert {job.attempts for job in found} == {1}
    packs: dict[str, list[str]] = {}
    for job in found:
        packs.setdefault(job.result["pack"]["id"], []).append(job.id)
        assert job.result["engine"] == "fused"
    assert sorted(len(members) for members in packs.values()) == [2] * 5
    # `lrq results` says which pack each job trained in, and its size.
    shown = json.loads(run_cli("results", *ids, "--all-columns", "--format", "json").stdout)
    assert {row["id"]: (row["pack_id"], row["pack_size"]) for row in shown} == {
        job_id: (pack, 2) for pack, members in packs.items() for job_id in members
    }
    assert len({data_key(job.spec, job.dataset_id) for job in found}) == 1
    for job in found:
        lr = job.spec["optimizer"]["lr"]
        expected = lrq_run(SWEEP_SPEC, "--set", "epochs=8", "--set", f"optimizer.lr={lr}")
        assert assert_fresh_history(url, job, 8) == expected["history"]


def test_a_duplicated_message_runs_the_job_once(lrq_env: dict[str, str], tmp_path: Path) -> None:
    from service.queue import make_app, publish
    from service.settings import Settings

    url = lrq_env["LRQ_DATABASE_URL"]
    [job_id] = submit_ids(
        SWEEP_SPEC, "--set", "data.synthetic.n_samples=40000", "--set", "epochs=60"
    )
    publish(make_app(Settings()), [(job_id, "cpu"), (job_id, "cpu")], timeout=2)
    # Two pool processes: the copies can arrive side by side.
    with worker(lrq_env, tmp_path / "worker.log", concurrency=2) as process:
        [job] = wait_jobs(url, [job_id], timeout=60, workers=[process])
        wait_for(
            lambda: process.text().count("'skipped'") == 2, timeout=30, what="two copies skipped"
        )
    assert (job.state, job.attempts) == ("succeeded", 1)
    assert_fresh_history(url, job, 60)
    assert process.text().count("'succeeded'") == 1


def test_default_setup_needs_no_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A bare laptop: SQLite and the filesystem broker under LRQ_HOME, two terminals."""
    for key in list(os.environ):
        if key.startswith("LRQ_"):
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    env = {**os.environ, "LRQ_HOME": str(home)}
    upgraded = cli_process("db", "upgrade", env=env, timeout=60)
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"sqlite:///{home / 'lrq.db'} at revision" in upgraded.stdout
    with worker(env, tmp_path / "worker.log") as process:
        submitted = cli_process(
            "submit",
            NUMPY_SPEC,
            "--wait",
            f"--timeout={120 * DEADLINE_SCALE:g}",
            env=env,
            timeout=150,
        )
        assert submitted.returncode == 0, submitted.stderr + process.text()[-3000:]
    job_id, _name, queue = submitted.stdout.splitlines()[0].split()
    assert queue == "queue=cpu"
    assert submitted.stdout.splitlines()[-1] == f"{job_id[:12]}  succeeded"
    assert (home / "broker" / "queue").is_dir()
    [job] = load_jobs(f"sqlite:///{home / 'lrq.db'}", [job_id])
    assert (job.state, job.epochs_done) == ("succeeded", 1000)


def test_gpu_workers_refused_without_cuda(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sqlite_url: str
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA: the refusal is for hosts without it")
    from service import db

    db.upgrade(sqlite_url)
    monkeypatch.setenv("LRQ_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LRQ_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("LRQ_BROKER_URL", "")
    for args in (["--queues", "gpu"], ["--gpus", "all"]):
        refused = run_cli("worker", *args)
        assert refused.exit_code == 1, args
        assert "CUDA is not available" in refused.stderr, refused.stderr
    refused_pool = cli_process("worker", "--gpus", "0", env=dict(os.environ), timeout=120)
    assert refused_pool.returncode != 0
    assert "CUDA is not available" in refused_pool.stderr, refused_pool.stderr


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_database_without_the_schema_is_refused(
    kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url: str = request.getfixturevalue("sqlite_url" if kind == "sqlite" else "pg_url")
    monkeypatch.setenv("LRQ_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LRQ_DATABASE_URL", url)
    for args in (["status"], ["submit", NUMPY_SPEC], ["worker"]):
        refused = run_cli(*args)
        assert refused.exit_code == 1, args
        assert "has no lrq schema" in refused.stderr
        assert "run `lrq db upgrade`" in refused.stderr
    assert run_cli("db", "upgrade").exit_code == 0
    shown = run_cli("status")
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.split() == STATUS_HEADER


def test_demo_runs_the_tutorial_with_no_server(tmp_path: Path) -> None:
    home = tmp_path / "demo"
    result = run_cli("demo", "--home", str(home))
    assert result.exit_code == 0, result.output
    assert "tutorial-torch (" in result.stdout and "tutorial-numpy (" in result.stdout
    found = load_jobs(f"sqlite:///{home / 'lrq.db'}")
    assert sorted((job.name, job.state, job.epochs_done) for job in found) == [
        ("tutorial-numpy", "succeeded", 1000),
        ("tutorial-torch", "succeeded", 500),
    ]
