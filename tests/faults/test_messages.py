"""Messages a worker cannot read, written straight into Redis as a buggy or foreign producer
would, and a broker connection closed under a channel that is still in use."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.faults.conftest import Cluster, training_spec
from tests.support import DEADLINE_SCALE, RedisServer

pytestmark = pytest.mark.faults

#: What the worker logs when it drops a message (its own guard, or Celery's own handlers).
DISCARDED = re.compile(
    r"discarded an unreadable message|Received unregistered task|"
    r"Received and deleted unknown message|Can't decode message body|Received invalid task"
)


def envelope(queue: str, **changes: Any) -> dict[str, Any]:
    """A kombu message for ``lrq.run_job`` with an empty body, with fields replaced."""
    message: dict[str, Any] = {
        "body": "W10=",  # base64 of "[]"
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"task": "lrq.run_job", "id": "junk"},
        "properties": {
            "delivery_info": {"exchange": "", "routing_key": queue},
            "body_encoding": "base64",
            "delivery_tag": "junk-tag",
            "priority": 0,
        },
    }
    message.update(changes)
    return message


def malformed(queue: str) -> dict[str, bytes]:
    """Each shape of message the issue lists, and a few more, by name."""
    shapes: dict[str, Any] = {
        "body not base64": envelope(queue, body="!!not base64!!"),
        "body a JSON object": envelope(queue, body={"a": 1}),
        "body a JSON list": envelope(queue, body=[1, 2]),
        "properties null": envelope(queue, properties=None),
        "properties a list": envelope(queue, properties=[1, 2]),
        "headers null": envelope(queue, headers=None),
        "a foreign task": envelope(queue, headers={"task": "other.task", "id": "x"}),
        "pickle content": envelope(queue, **{"content-type": "application/x-python-serialize"}),
        "body not JSON": envelope(queue, body="bm90IGpzb24="),
        "no arguments": envelope(queue),
        "a JSON string": "just a string",
    }
    out = {name: json.dumps(value).encode() for name, value in shapes.items()}
    out["raw bytes"] = b"\xff\xfe\x00 raw bytes"
    out["empty string"] = b""
    return out


def push_junk(client: Any, queue: str) -> int:
    junk = malformed(queue)
    for raw in junk.values():
        client.lpush(queue, raw)
    return len(junk)


def test_a_worker_discards_malformed_messages_and_keeps_consuming(
    sqlite_cluster: Cluster, redis_server: RedisServer
) -> None:
    cluster = sqlite_cluster
    client = redis_server.client()
    count = push_junk(client, "cpu")
    worker = cluster.start_worker("a")
    cluster.wait(lambda: client.llen("cpu") == 0, timeout=120, what="the junk consumed")
    cluster.wait(
        lambda: len(DISCARDED.findall(worker.text())) >= count,
        timeout=60,
        what=f"{count} messages logged as dropped",
    )

    spec = training_spec("after-the-junk", epochs=60)
    job_id = cluster.submit(spec)
    cluster.wait_finished(job_id)
    cluster.assert_as_uninterrupted(job_id, spec)
    assert worker.process.poll() is None, cluster.logs()
    text = worker.text()
    assert "Unrecoverable error" not in text
    assert len(DISCARDED.findall(text)) == count, text  # each logged once
    # Nothing was kept as delivered, so nothing goes back on the queue for the next worker.
    worker.stop()
    assert (client.llen("cpu"), client.hlen("unacked")) == (0, 0)


def lose_message(cluster: Cluster, client: Any, job_id: str) -> None:
    """Drop the cpu queue, as a broker losing its data would, a while after the publish."""
    import datetime as dt

    from sqlalchemy import update

    from service import db
    from service.jobs import utcnow
    from service.models import Job

    client.delete("cpu")
    with db.transaction(cluster.url) as session:
        old = utcnow() - dt.timedelta(hours=1)
        session.execute(update(Job).where(Job.id == job_id).values(published_at=old))


def test_reconcile_republishes_a_lost_job_with_junk_on_the_queues(
    sqlite_cluster: Cluster, redis_server: RedisServer
) -> None:
    cluster = sqlite_cluster
    client = redis_server.client()
    spec = training_spec("lost-among-junk", epochs=40)
    job_id = cluster.submit(spec)
    lose_message(cluster, client, job_id)
    for queue in ("cpu", "gpu"):
        push_junk(client, queue)
    client.hset("unacked", "junk-tag", b"\xff not json")
    client.zadd("unacked_index", {"junk-tag": 0.0})

    reconciled = subprocess.run(
        [sys.executable, "-m", "service.cli", "reconcile"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120 * DEADLINE_SCALE,
        check=False,
    )
    assert reconciled.returncode == 0, reconciled.stderr
    assert "published 1" in reconciled.stdout

    # A worker's own reconciler, too, reads past the junk parked on the gpu queue.
    lose_message(cluster, client, job_id)
    worker = cluster.start_worker("a")
    cluster.wait_finished(job_id)
    cluster.assert_as_uninterrupted(job_id, spec)
    assert "reconcile pass failed" not in worker.text()
    assert worker.process.poll() is None


def test_a_channel_of_a_closed_connection_raises_a_connection_error(
    redis_server: RedisServer,
) -> None:
    """After a broker restart a timer may still reach a channel of the closed connection (the
    unacked-restore sweep, a late ack): kombu would raise an AttributeError that ends the
    worker; a connection error is what kombu and Celery handle."""
    import redis

    from service.queue import make_app
    from service.settings import Settings

    app = make_app(Settings(broker_url=redis_server.url))
    connection = app.connection_for_read()
    channel = connection.default_channel
    channel.basic_consume("cpu", False, lambda message: None, "tag")
    connection.transport.client = None  # what kombu's close does to the connection's transport
    try:
        with pytest.raises(redis.ConnectionError):
            channel.qos.restore_visible(interval=1)
        with pytest.raises(redis.ConnectionError):
            channel.qos.ack("a-tag")
    finally:
        channel.close()


def test_a_worker_on_the_filesystem_broker_discards_malformed_message_files(
    make_cluster: Callable[..., Cluster], sqlite_url: str
) -> None:
    cluster = make_cluster(sqlite_url, "")  # no broker URL: the filesystem broker
    folder = Path(cluster.env["LRQ_HOME"]) / "broker" / "queue"
    folder.mkdir(parents=True, exist_ok=True)
    junk = malformed("cpu")
    for index, raw in enumerate(junk.values()):
        # Named as kombu names its files: "<anything without a dot>.<queue>.msg".
        (folder / f"junk_{index:02d}.cpu.msg").write_bytes(raw)
    worker = cluster.start_worker("a")
    cluster.wait(
        lambda: not list(folder.glob("junk_*")), timeout=120, what="the junk files consumed"
    )

    spec = training_spec("after-the-junk-files", epochs=60)
    job_id = cluster.submit(spec)
    cluster.wait_finished(job_id)
    cluster.assert_as_uninterrupted(job_id, spec)
    assert worker.process.poll() is None, cluster.logs()
    text = worker.text()
    assert "Unrecoverable error" not in text
    assert len(DISCARDED.findall(text)) == len(junk), text
