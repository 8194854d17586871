"""Monitoring: task events name the job and its outcome, `lrq info` describes each worker,
worker logs carry the job id (as JSON with LRQ_LOG_FORMAT=json)."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.support import WorkerProcess, run_cli, set_lrq_env, submit_ids, wait_for, wait_jobs

ROOT = Path(__file__).resolve().parents[2]
SWEEP_SPEC = str(ROOT / "examples" / "sweep.yaml")
# The reference loop: a fused run of this size can finish before `info` is asked.
SLOW = ("--set", "data.synthetic.n_samples=20000", "--set", "batch_size=16", "--set", "engine=loop")


class Events(threading.Thread):
    """Celery task events from the broker, collected while the test runs."""

    def __init__(self, broker_url: str) -> None:
        super().__init__(daemon=True)
        from service.queue import make_app
        from service.settings import Settings

        self.app = make_app(Settings(broker_url=broker_url))
        self.seen: list[dict[str, Any]] = []
        self.ready = threading.Event()
        self.receiver: Any = None

    def run(self) -> None:
        with self.app.connection() as connection:
            self.receiver = self.app.events.Receiver(connection, handlers={"*": self.seen.append})
            self.ready.set()
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.join(10)

    def of(self, kind: str, job_id: str) -> list[dict[str, Any]]:
        return [e for e in list(self.seen) if e["type"] == kind and e.get("uuid") == job_id]


def test_task_events_info_and_json_logs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_url: str
) -> None:
    from service import db

    url = f"sqlite:///{tmp_path / 'lrq.db'}"
    db.upgrade(url)
    env = {
        **os.environ,
        **set_lrq_env(monkeypatch, tmp_path, database_url=url, broker_url=redis_url),
        "PYTHONPATH": str(ROOT),
        "LRQ_LOG_FORMAT": "json",
    }
    events = Events(redis_url)
    events.start()
    assert events.ready.wait(30)
    [good] = submit_ids(SWEEP_SPEC, "--set", "epochs=5")
    [bad] = submit_ids(SWEEP_SPEC, "--set", "optimizer.lr=1e4")
    [slow] = submit_ids(SWEEP_SPEC, *SLOW, "--set", "epochs=400")
    worker = WorkerProcess(env, tmp_path / "worker.log", name="lrq-watched@here")
    try:
        worker.wait_ready()

        def running() -> list[Any]:
            shown = run_cli("info").stdout.splitlines()
            return [line for line in shown if slow[:12] in line]

        [line] = wait_for(running, timeout=60, what="info naming the running job")
        fields = line.split()
        assert fields[0] == "lrq-watched@here"
        assert fields[fields.index("host") + 1] == socket.gethostname()
        assert fields[fields.index("queues") + 1] == "cpu"
        assert fields[fields.index("running") + 1] == slow[:12]
        found = wait_jobs(url, [good, bad, slow], timeout=120, workers=[worker])
        wait_for(lambda: events.of("task-failed", bad), timeout=30, what="a task-failed event")
        wait_for(lambda: events.of("task-succeeded", slow), timeout=30, what="the slow job's")
    finally:
        worker.stop()
        events.stop()
    assert [job.state for job in found] == ["succeeded", "diverged", "succeeded"]

    # The task is the job: events carry its id; a diverged job is a failed task.
    [succeeded] = events.of("task-succeeded", good)
    assert succeeded["result"] == repr({"job_id": good, "outcome": "succeeded"})
    [failed] = events.of("task-failed", bad)
    assert f"job {bad}: diverged" in failed["exception"]
    assert events.of("task-succeeded", bad) == []
    assert events.of("task-sent", good) and events.of("task-started", good)

    # Every log line after the banner is one JSON object; the task's lines name their job.
    lines = [ln for ln in worker.text().splitlines() if ln.startswith("{")]
    records = [json.loads(ln) for ln in lines]
    assert {"time", "level", "logger", "message", "job_id"} <= set(records[0])
    mine = [r for r in records if r["job_id"] == bad]
    assert any("diverged" in r["message"] for r in mine), records[-5:]
    assert any(r["message"] == f"Task lrq.run_job[{bad}] received" for r in mine)
    assert not any(ln.startswith("[20") for ln in worker.text().splitlines())
