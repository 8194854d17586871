"""Asking live workers what they are: host, queues, GPUs and the jobs they run (`lrq info`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: The remote-control command each worker answers (registered in workers/monitor.py).
INFO_COMMAND = "lrq_worker_info"


@dataclass(frozen=True)
class WorkerInfo:
    name: str
    host: str
    queues: list[str]
    gpus: str | None
    jobs: list[str]


def worker_details(app: Any, timeout: float = 1.0) -> list[WorkerInfo]:
    """Every worker that answers within ``timeout``, by name."""
    replies = app.control.broadcast(INFO_COMMAND, reply=True, timeout=timeout) or []
    out = []
    for reply in replies:
        for name, body in reply.items():
            if not isinstance(body, dict) or "host" not in body:
                continue  # a worker without the command answers with an error
            out.append(
                WorkerInfo(
                    name=str(name),
                    host=str(body["host"]),
                    queues=[str(q) for q in body.get("queues") or []],
                    gpus=None if body.get("gpus") is None else str(body["gpus"]),
                    jobs=[str(j) for j in body.get("jobs") or []],
                )
            )
    return sorted(out, key=lambda w: w.name)


def worker_line(worker: WorkerInfo) -> str:
    gpus = "all visible" if worker.gpus is None else (worker.gpus or "none")
    running = ", ".join(j[:12] for j in worker.jobs) or "idle"
    return (
        f"  {worker.name}  host {worker.host}  queues {','.join(worker.queues) or '-'}"
        f"  gpus {gpus}  running {running}"
    )
