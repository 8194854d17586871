"""A worker launcher for fault tests: `python -m tests.faults.killer worker ...`.

It runs the ordinary `lrq worker` with ``workers.engines.train`` wrapped, so that a job whose
spec name starts with ``kill-me`` SIGKILLs its own pool process after a few epochs, and one whose
name starts with ``hang-`` blocks the soft-time-limit signal and sleeps, as a task stuck in a
long C call would. Every other job runs untouched. Production code has no hook for this.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from workers import engines
from workers.engines.base import EpochRecord, OnEpoch, RunResult

#: Epochs a faulty job runs (in each attempt) before it misbehaves.
FAULT_AFTER_EPOCHS = 5

_train = engines.train


def _misbehave(name: str) -> None:
    if name.startswith("kill-me"):
        os.kill(os.getpid(), signal.SIGKILL)
    if name.startswith("hang-"):
        # Celery's soft limit is SIGUSR1; blocked, it stays pending as in a long C call.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        while True:
            time.sleep(3600)


def train_with_faults(spec: Any, data: Any, **options: Any) -> RunResult:
    """``engines.train``, with the misbehaviour the job's name asks for."""
    name = str(spec.name)
    if not name.startswith(("kill-me", "hang-")):
        return _train(spec, data, **options)
    inner: OnEpoch | None = options.pop("on_epoch", None)
    seen = 0

    def on_epoch(record: EpochRecord, snapshot: Any) -> None:
        nonlocal seen
        if inner is not None:
            inner(record, snapshot)
        seen += 1
        if seen >= FAULT_AFTER_EPOCHS:
            _misbehave(name)

    return _train(spec, data, on_epoch=on_epoch, **options)


def main() -> None:
    engines.train = train_with_faults
    from service.cli import main as lrq

    lrq(args=sys.argv[1:], prog_name="lrq")


if __name__ == "__main__":
    main()
