"""Starting workers: one Celery worker here, or one worker process per GPU."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

from service.errors import DeviceError
from service.queue import make_app
from service.settings import Settings

#: How long a new pool process may take to start before Celery replaces it.
PROCESS_START_SECONDS = 60.0


def visible_gpus() -> list[int]:
    """Indices of the CUDA devices this host has; DeviceError where there are none."""
    import torch

    if not torch.cuda.is_available():
        raise DeviceError("--gpus: CUDA is not available on this host (no GPU or no CUDA build)")
    return list(range(torch.cuda.device_count()))


def run_worker(
    settings: Settings,
    *,
    queues: Sequence[str],
    concurrency: int,
    name: str | None,
    loglevel: str,
) -> None:
    """Run a Celery worker in this process until it is stopped."""
    from workers.tasks import register_tasks

    if "gpu" in queues:
        import torch

        if not torch.cuda.is_available():
            raise DeviceError("--queues gpu: CUDA is not available on this host")
    app = make_app(settings)
    # Celery kills a new pool process that has not reported in within 4 s; on a loaded host
    # even a light start-up can take longer, and each kill is followed by another attempt that
    # meets the same load. The slow set-up (torch) happens at a process's first job instead.
    app.conf.worker_proc_alive_timeout = PROCESS_START_SECONDS
    threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // concurrency)
    register_tasks(app, settings, torch_threads=threads)
    nodename = name or f"lrq-{'-'.join(queues)}@{socket.gethostname()}"
    # app.worker_main (and app.start) drop the exit code of Celery's command, which runs
    # without click's standalone mode: a worker that stopped on an error must not exit 0,
    # or a supervisor that restarts failed workers leaves it down.
    from celery.bin.celery import celery as celery_command

    celery_command.params[0].default = app  # what app.start does: the --app default
    try:
        code = celery_command.main(
            args=[
                "worker",
                f"--queues={','.join(queues)}",
                f"--concurrency={concurrency}",
                f"--hostname={nodename}",
                f"--loglevel={loglevel}",
                "--without-gossip",
                "--without-mingle",
                "--optimization=fair",
            ],
            standalone_mode=False,
        )
    finally:
        celery_command.params[0].default = None
    if isinstance(code, int) and code:
        sys.exit(code)


def gpu_assignments(gpus: Sequence[int], visible: str | None) -> list[str]:
    """The CUDA_VISIBLE_DEVICES value for each requested index: indices count within the
    devices this process may see (all of them when ``visible`` is unset)."""
    if visible is None:
        return [str(gpu) for gpu in gpus]
    devices = [d.strip() for d in visible.split(",") if d.strip()]
    missing = [gpu for gpu in gpus if gpu >= len(devices)]
    if missing:
        raise DeviceError(
            f"--gpus: index {missing[0]} is past the {len(devices)} visible device(s) "
            f"(CUDA_VISIBLE_DEVICES={visible})"
        )
    return [devices[gpu] for gpu in gpus]


def run_gpu_pool(gpus: Sequence[int], *, queues: Sequence[str], loglevel: str) -> int:
    """One worker process per GPU, each seeing only its own device; returns when all exit."""
    if not gpus:
        raise DeviceError("--gpus: no GPUs to start workers on")
    count = len(visible_gpus())
    missing = [gpu for gpu in gpus if gpu >= count]
    if missing:
        raise DeviceError(f"--gpus: no GPU {missing[0]} on this host ({count} visible)")
    host = socket.gethostname()
    children: list[subprocess.Popen[bytes]] = []
    for gpu, device in zip(
        gpus, gpu_assignments(gpus, os.environ.get("CUDA_VISIBLE_DEVICES")), strict=True
    ):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=device)
        command = [
            sys.executable, "-m", "service.cli", "worker",
            f"--queues={','.join(queues)}", "--concurrency=1",
            f"--name=lrq-gpu{gpu}@{host}", f"--loglevel={loglevel}",
        ]  # fmt: skip
        children.append(subprocess.Popen(command, env=env))

    def forward(signum: int, _frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while any(child.poll() is None for child in children):
        time.sleep(0.5)
    return max(child.returncode or 0 for child in children)
