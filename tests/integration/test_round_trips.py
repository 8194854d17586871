"""What a job costs on the wire: broker round trips per publish, database transactions and
statements per job, and frames built straight from rows."""

from __future__ import annotations

from typing import Any

import pytest


def test_a_sweeps_messages_are_one_pipeline_whatever_its_size(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis.client
    import redis.connection

    from service.queue import held_job_ids, make_app, publish
    from service.settings import Settings

    sends: list[int] = []
    pipelines: list[int] = []
    send = redis.connection.AbstractConnection.send_packed_command
    execute = redis.client.Pipeline.execute

    def counted_send(self: Any, command: Any, check_health: bool = True) -> None:
        sends.append(1)
        send(self, command, check_health)

    def counted_execute(self: Any, raise_on_error: bool = True) -> Any:
        names = [command[0][0] for command in self.command_stack]
        pipelines.append(names.count("LPUSH"))
        return execute(self, raise_on_error)

    # Counting wrappers around the real client: every command still reaches the real Redis.
    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted_send)
    monkeypatch.setattr(redis.client.Pipeline, "execute", counted_execute)
    app = make_app(Settings(broker_url=redis_url))
    round_trips = []
    for size in (3, 300):
        ids = [f"{size:04d}{i:028x}" for i in range(size)]
        sends.clear()
        pipelines.clear()
        publish(
            app, [(job_id, "cpu" if i % 2 else "gpu") for i, job_id in enumerate(ids)], timeout=5
        )
        # Declaring the two queues reads their lengths in pipelines of their own.
        assert [n for n in pipelines if n] == [size], "every message in one pipeline"
        round_trips.append(len(sends))
        assert set(ids) <= (held_job_ids(app) or set())
    assert round_trips[1] <= round_trips[0], round_trips
    assert round_trips[0] < 30, round_trips  # connecting and declaring, not one per message
