"""Starting workers: one Celery worker here, or one worker process per GPU."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
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
    from workers.tasks import interrupted, register_tasks

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
    if interrupted.is_set():
        sys.exit(130)  # Ctrl-C, as shells expect (Celery itself exits 1)
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


@dataclass(frozen=True)
class Backoff:
    """How the supervisor restarts a dead worker: after ``first`` seconds, doubling with each
    death soon after a start (up to ``longest``); ``give_up_after`` such deaths in a row stop
    the pool, since the next restart would die the same way."""

    first: float = 1.0
    longest: float = 30.0
    #: A worker that ran less than this many seconds died "fast".
    fast: float = 10.0
    give_up_after: int = 5

    def delay(self, fast_deaths: int) -> float:
        return float(min(self.first * 2.0 ** max(fast_deaths - 1, 0), self.longest))


@dataclass
class Child:
    """One supervised worker process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    fast_deaths: int = 0
    restart_at: float | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, env=self.env)
        self.started = time.monotonic()
        self.restart_at = None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def _say(message: str) -> None:
    print(f"lrq pool: {message}", file=sys.stderr, flush=True)


def _describe(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def supervise(children: Sequence[Child], *, backoff: Backoff, poll: float = 0.2) -> int:
    """Run the children, restarting any that dies, until SIGTERM or SIGINT stops them all (0),
    or one dies ``give_up_after`` times in a row soon after starting (1)."""
    stopping: list[int] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)
        for child in children:
            if child.alive():
                assert child.process is not None
                child.process.send_signal(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for child in children:
            child.start()
            _say(f"started {child.name} (pid {child.process.pid if child.process else '?'})")
        while True:
            if stopping:
                if not any(child.alive() for child in children):
                    _say("every worker stopped")
                    return 0
                time.sleep(poll)
                continue
            now = time.monotonic()
            for child in children:
                if child.restart_at is not None:
                    if now >= child.restart_at:
                        child.start()
                        assert child.process is not None
                        _say(f"restarted {child.name} (pid {child.process.pid})")
                    continue
                if child.process is None or child.alive():
                    continue
                code = child.process.returncode
                ran = now - child.started
                child.fast_deaths = child.fast_deaths + 1 if ran < backoff.fast else 1
                if child.fast_deaths >= backoff.give_up_after:
                    _say(
                        f"error: {child.name} died {child.fast_deaths} times in a row within "
                        f"{backoff.fast:g}s of starting (last: {_describe(code)}); giving up "
                        "and stopping the pool"
                    )
                    stop(signal.SIGTERM, None)
                    for other in children:
                        if other.process is not None:
                            other.process.wait()
                    return 1
                delay = backoff.delay(child.fast_deaths)
                child.restart_at = now + delay
                _say(
                    f"{child.name} died ({_describe(code)}) after {ran:.1f}s; restart in {delay:g}s"
                )
            time.sleep(poll)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_gpu_pool(
    gpus: Sequence[int],
    *,
    queues: Sequence[str],
    loglevel: str,
    command: Sequence[str] | None = None,
    device_count: int | None = None,
    backoff: Backoff = Backoff(),
) -> int:
    """Supervise one worker process per GPU, each seeing only its own device and named
    ``gpuN@host``; returns 0 after a clean stop, 1 when a worker keeps dying.

    ``command`` (the worker's argv before its options) and ``device_count`` stand in for
    `lrq worker` and CUDA where there is no GPU."""
    if not gpus:
        raise DeviceError("--gpus: no GPUs to start workers on")
    count = len(visible_gpus()) if device_count is None else device_count
    missing = [gpu for gpu in gpus if gpu >= count]
    if missing:
        raise DeviceError(f"--gpus: no GPU {missing[0]} on this host ({count} visible)")
    host = socket.gethostname()
    base = list(command or [sys.executable, "-m", "service.cli", "worker"])
    children = []
    for gpu, device in zip(
        gpus, gpu_assignments(gpus, os.environ.get("CUDA_VISIBLE_DEVICES")), strict=True
    ):
        name = f"gpu{gpu}@{host}"
        argv = [
            *base, f"--queues={','.join(queues)}", "--concurrency=1", f"--name={name}",
            f"--loglevel={loglevel}",
        ]  # fmt: skip
        children.append(Child(name, argv, dict(os.environ, CUDA_VISIBLE_DEVICES=device)))
    return supervise(children, backoff=backoff)
