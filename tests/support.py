"""Helpers the integration and fault tests share: real servers and real worker processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner, Result

T = TypeVar("T")
REQUIRE_SERVICES = os.environ.get("LRQ_REQUIRE_SERVICES") == "1"
#: Every wait's deadline is this many times the one a test names: a loaded 2-core machine runs
#: the suite many times slower than an idle one, and a deadline only bounds how long a
#: failing wait takes, never how fast something must be.
DEADLINE_SCALE = 5.0


def need(reason: str) -> None:
    """Skip with the reason on a laptop; fail in CI, where every service must be present."""
    if REQUIRE_SERVICES:
        pytest.fail(f"required service missing: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Callable[[], T], *, timeout: float, what: str, every: float = 0.1) -> T:
    """Poll until check() returns something truthy; fail naming what never happened."""
    timeout *= DEADLINE_SCALE
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


class RedisServer:
    """A redis-server of the test's own on a free port; it can be stopped and restarted."""

    def __init__(self, workdir: Path, *, bind: str = "127.0.0.1") -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            need("redis-server is not installed")
        self.binary = binary or "redis-server"
        self.workdir = workdir
        self.bind = bind
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.bind}:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                self.bind,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self.ping, timeout=10, what=f"redis on port {self.port}")

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(host=self.bind, port=self.port, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def client(self) -> Any:
        import redis

        return redis.Redis(host=self.bind, port=self.port, socket_timeout=5)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None


class WorkerProcess:
    """`lrq worker` as a real process, with its log kept for failure messages."""

    def __init__(
        self,
        env: Mapping[str, str],
        log: Path,
        *,
        queues: str = "cpu",
        concurrency: int = 1,
        name: str | None = None,
        command: Sequence[str] | None = None,
        netns: str | None = None,
    ) -> None:
        self.log = log
        argv = list(command or [sys.executable, "-m", "service.cli", "worker"])
        argv += [f"--queues={queues}", f"--concurrency={concurrency}", "--loglevel=INFO"]
        if name:
            argv.append(f"--name={name}")
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.handle = log.open("ab")
        self.process = subprocess.Popen(
            argv,
            env=dict(env),
            stdout=self.handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> WorkerProcess:
        def ready() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"worker exited with {self.process.returncode}:\n{self.text()[-3000:]}")
            return " ready." in self.text()

        wait_for(ready, timeout=timeout, what=f"worker ready (log {self.log})")
        return self

    def pool_pids(self) -> list[int]:
        """Pids of this worker's pool processes (its children)."""
        out = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, check=False
        )
        return [int(p) for p in out.stdout.split()]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole worker: main process and pool."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def stop(self, timeout: float = 30) -> None:
        if self.process.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.process.wait(10)
        self.kill(signal.SIGKILL)  # any pool process left behind
        self.handle.close()


def run_cli(*args: str, input: str | None = None) -> Result:
    """Invoke `lrq` in this process with the current environment, settings read afresh."""
    from service.cli import main

    reset_caches()
    result = CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)
    reset_caches()
    return result


def reset_caches() -> None:
    """Forget settings, the Celery app and engines, so a changed environment takes effect."""
    from service import db
    from service.queue import get_app
    from service.settings import get_settings

    get_settings.cache_clear()
    get_app.cache_clear()
    db.dispose_all()
    db.use_worker_sessions(False)  # an in-process `lrq worker` turns them on


# -- jobs through the CLI and the database ----------------------------------------------------

FINISHED = ("succeeded", "failed", "diverged", "cancelled")


def submit_ids(*args: str) -> list[str]:
    """`lrq submit ARGS -q` in this process; the ids of the jobs it recorded (a sweep's id comes
    first on a line marked with "#")."""
    result = run_cli("submit", *args, "-q")
    assert result.exit_code == 0, result.output
    return [line for line in result.stdout.split("\n") if line and not line.startswith("#")]


def load_jobs(url: str, ids: Sequence[str] | None = None) -> list[Any]:
    """Job rows (all of them when ids is None), oldest first."""
    from service import db, jobs

    with db.transaction(url) as session:
        return jobs.find_jobs(session=session, ids=None if ids is None else list(ids))


def wait_jobs(
    url: str,
    ids: Sequence[str],
    *,
    timeout: float,
    states: Sequence[str] = FINISHED,
    workers: Sequence[WorkerProcess] = (),
) -> list[Any]:
    """Poll until every job is in one of ``states``; fail with their states and worker logs."""
    timeout *= DEADLINE_SCALE
    deadline = time.monotonic() + timeout
    while True:
        found = load_jobs(url, ids)
        if len(found) == len(set(ids)) and all(job.state in states for job in found):
            return found
        if time.monotonic() > deadline:
            seen = ", ".join(f"{job.id[:8]} {job.state}" for job in found)
            logs = "".join(f"\n--- {w.log}:\n{w.text()[-3000:]}" for w in workers)
            wanted = "/".join(states)
            pytest.fail(f"timed out after {timeout:g}s waiting for {wanted}: {seen}{logs}")
        time.sleep(0.1)


def epoch_losses(url: str, job_id: str) -> list[tuple[int, float]]:
    """A job's stored (epoch, train_loss) rows in epoch order."""
    from service import db, jobs

    with db.transaction(url) as session:
        return [(row.epoch, row.train_loss) for row in jobs.history_rows([job_id], session=session)]


# -- a password-protected Redis, and what bad input must leave unchanged -----------------------


class PasswordRedisServer(RedisServer):
    """A RedisServer that requires a password (``--requirepass``); its url carries it."""

    def __init__(self, workdir: Path, *, password: str, bind: str = "127.0.0.1") -> None:
        super().__init__(workdir, bind=bind)
        self.password = password

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@{self.bind}:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [self.binary, "--port", str(self.port), "--bind", self.bind, "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(self.workdir)]
        argv += ["--requirepass", self.password]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.ping, timeout=10, what=f"redis on port {self.port}")

    def ping(self) -> bool:
        import redis

        try:
            return bool(self.client(timeout=1).ping())
        except redis.RedisError:
            return False

    def client(self, timeout: float = 5) -> Any:
        import redis

        return redis.Redis(
            host=self.bind, port=self.port, password=self.password, socket_timeout=timeout
        )


def state_counts(url: str, redis_client: Any) -> dict[str, int]:
    """Rows per lrq table, messages on the cpu and gpu queues, unacked messages, Redis keys."""
    from sqlalchemy import func, select

    from service import db
    from service.models import Dataset, Epoch, Job, Sweep

    with db.transaction(url) as session:
        out = {
            model.__tablename__: int(session.scalar(select(func.count()).select_from(model)) or 0)
            for model in (Job, Sweep, Dataset, Epoch)
        }
    db.dispose_all()
    return out | {
        "redis cpu": int(redis_client.llen("cpu")),
        "redis gpu": int(redis_client.llen("gpu")),
        "redis unacked": int(redis_client.hlen("unacked")),
        "redis keys": int(redis_client.dbsize()),
    }


def small_spec() -> dict[str, Any]:
    """A small valid spec (40 rows, 30 for training, a 10-row test set); tests change one thing."""
    return {
        "name": "base",
        "data": {
            "synthetic": {"n_samples": 40, "n_features": 2, "coefficients": [1, 2], "seed": 1},
            "test": {"fraction": 0.25},
        },
        "backend": "numpy",
        "model": {"fit_intercept": True, "init": "zeros"},
        "optimizer": {"lr": 0.001},
        "epochs": 3,
        "batch_size": 10,
    }


#: Short leases and frequent reconciling, so tests see recovery within seconds.
FAST_SETTINGS = {
    "LRQ_LEASE_SECONDS": "6",
    "LRQ_RECONCILE_INTERVAL": "1",
    "LRQ_RECORD_EVERY_SECONDS": "0.2",
    "LRQ_BROKER_TIMEOUT": "2",
}


def set_lrq_env(
    monkeypatch: pytest.MonkeyPatch,
    tmp: Path,
    *,
    database_url: str,
    broker_url: str | None = None,
    **extra: str,
) -> dict[str, str]:
    """Set LRQ_* for a test (extra settings by name: ``max_attempts="2"``); returns them."""
    values = {
        "LRQ_HOME": str(tmp / "home"),
        "LRQ_DATABASE_URL": database_url,
        "LRQ_DATA_DIR": str(tmp),
        **FAST_SETTINGS,
    }
    if broker_url is not None:
        values["LRQ_BROKER_URL"] = broker_url
    values.update({f"LRQ_{key.upper()}": value for key, value in extra.items()})
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    reset_caches()
    return values


#: In ``with_changes``, a value that removes the field.
DELETE = object()


def with_changes(document: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of a document with ``{"a.b": value}`` set (DELETE removes the field)."""
    import copy

    out = copy.deepcopy(document)
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return out
