"""What a worker tells about itself: `lrq info`'s reply, log lines naming the job, JSON logs."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
from typing import Any

from service.monitor import INFO_COMMAND

_registered = False


def register_info_command() -> None:
    """Teach this process's workers to answer INFO_COMMAND (once: the registry is global)."""
    global _registered
    if _registered:
        return
    from celery.worker.control import inspect_command

    @inspect_command(name=INFO_COMMAND)  # type: ignore[untyped-decorator]
    def _worker_info(state: Any) -> dict[str, Any]:
        from celery.worker import state as worker_state

        consumer = state.consumer.task_consumer
        queues = sorted(q.name for q in consumer.queues) if consumer else []
        running = sorted(str(r.args[0]) for r in worker_state.active_requests if r.args)
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": queues,
            # The supervisor pins each GPU worker to one device; unset means every device.
            "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "jobs": running,
        }

    _registered = True


def current_job_id() -> str | None:
    """The job the running task works on (its only argument), if any."""
    from celery import current_task

    request = getattr(current_task, "request", None)
    args = getattr(request, "args", None)
    return str(args[0]) if args else None


class JobIdFilter(logging.Filter):
    """Adds ``job_id`` to every record about a job: logged while it runs, or naming its task."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "job_id"):
            job_id = current_job_id()
            if job_id is None and isinstance(record.args, dict) and "id" in record.args:
                # Celery's "received" lines name the task, whose id is the job id.
                job_id = str(record.args["id"])
            record.job_id = job_id
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, process, message, job id."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
            "job_id": getattr(record, "job_id", None),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


TEXT_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"
TEXT_JOB_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] job %(job_id)s: %(message)s"


class TextFormatter(logging.Formatter):
    """Celery's layout, with ``job <id>:`` before messages logged while a job runs."""

    def format(self, record: logging.LogRecord) -> str:
        job = getattr(record, "job_id", None)
        self._style._fmt = TEXT_JOB_FORMAT if job else TEXT_FORMAT
        return super().format(record)


def configure_logging(logger: logging.Logger, log_format: str) -> None:
    """Give every handler of a Celery logger lrq's formatter and the job id filter."""
    formatter: logging.Formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    for handler in logger.handlers:
        handler.setFormatter(formatter)
        if not any(isinstance(f, JobIdFilter) for f in handler.filters):
            handler.addFilter(JobIdFilter())
