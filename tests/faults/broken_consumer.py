"""A worker launcher for fault tests: `python -m tests.faults.broken_consumer worker ...`.

It runs the ordinary `lrq worker` with kombu's Redis read of a delivered message made to raise,
as a bug in the consumer would: Celery stops the worker ("Unrecoverable error").
"""

from __future__ import annotations

import sys
from typing import Any

from kombu.transport import redis


def _broken_read(self: Any, **options: Any) -> Any:
    self._in_poll = None  # so that closing the channel does not read the reply again
    raise RuntimeError("a bug in the consumer")


def main() -> None:
    redis.Channel._brpop_read = _broken_read
    from service.cli import main as lrq

    lrq(args=sys.argv[1:], prog_name="lrq")


if __name__ == "__main__":
    main()
