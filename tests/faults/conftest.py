"""Fault-test fixtures: a cluster of real worker processes over one database and one broker,
a TCP forwarder that can be cut, and a private PostgreSQL instance that can be restarted."""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    DEADLINE_SCALE,
    WorkerProcess,
    free_port,
    need,
    run_cli,
    set_lrq_env,
    wait_for,
)

TERMINAL = ("succeeded", "failed", "diverged", "cancelled")
#: The worker launcher whose jobs named kill-me*/hang-* misbehave (see killer.py).
KILLER = (sys.executable, "-m", "tests.faults.killer", "worker")
ROOT = Path(__file__).resolve().parents[2]


def training_spec(
    name: str,
    *,
    epochs: int,
    backend: str = "numpy",
    n_samples: int = 4000,
    batch_size: int = 40,
) -> dict[str, Any]:
    """A float64 spec with shuffled mini-batches, momentum and a held-out test set."""
    return {
        "name": name,
        "data": {
            "synthetic": {
                "n_samples": n_samples,
                "n_features": 4,
                "coefficients": [1.5, -2.0, 0.5, 3.0],
                "intercept": 0.5,
                "noise_std": 0.1,
                "generator": "numpy",
                "seed": 11,
            },
            "test": {"fraction": 0.2},
        },
        "backend": backend,
        "device": "cpu",
        "model": {"fit_intercept": True, "init": "default"},
        "loss": {"reduction": "mean"},
        "optimizer": {"lr": 0.002, "momentum": 0.9},
        "epochs": epochs,
        "batch_size": batch_size,
        "shuffle": True,
        "seed": 5,
        "dtype": "float64",
        "eval_every": 3,
    }


@functools.cache
def _uninterrupted(spec_json: str) -> tuple[list[tuple[int, float, float | None]], Any, Any]:
    from service.spec import JobSpec
    from workers import engines
    from workers.data import build_train_data

    spec = JobSpec.model_validate(json.loads(spec_json))
    run = engines.train(spec, build_train_data(spec))
    assert run.status == "succeeded"
    history = [(r.epoch, r.train_loss, r.test_loss) for r in run.history]
    return history, run.summary["weights"], run.summary["bias"]


def uninterrupted_run(spec: Mapping[str, Any]) -> tuple[list[Any], Any, Any]:
    """History, weights and bias of the spec trained in this process without a break."""
    return _uninterrupted(json.dumps(spec, sort_keys=True))


class Cluster:
    """Worker processes sharing one database and one broker, and the test's view of both."""

    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.env = env
        self.url = env["LRQ_DATABASE_URL"]
        #: Where to read the database's sessions from when a wait fails (not through a proxy).
        self.inspect_url = self.url
        self.tmp = tmp
        self.workers: list[WorkerProcess] = []

    def start_worker(
        self,
        name: str,
        *,
        command: tuple[str, ...] | None = None,
        netns: str | None = None,
        concurrency: int = 1,
        env: Mapping[str, str] | None = None,
        ready: bool = True,
    ) -> WorkerProcess:
        worker = WorkerProcess(
            {**self.env, **(env or {})},
            self.tmp / f"worker-{name}.log",
            concurrency=concurrency,
            name=f"{name}@%h",
            command=command,
            netns=netns,
        )
        self.workers.append(worker)
        if ready:
            worker.wait_ready()
        return worker

    def start_terminal_worker(self, name: str) -> TerminalWorker:
        """A worker in a pseudo-terminal of its own (see TerminalWorker), once it is ready."""
        worker = TerminalWorker(self.env, self.tmp / f"worker-{name}.log", name=f"{name}@%h")
        self.workers.append(worker)  # type: ignore[arg-type]
        return worker.wait_ready()

    def submit(self, spec: Mapping[str, Any]) -> str:
        path = self.tmp / f"spec-{spec['name']}.json"
        path.write_text(json.dumps(spec))
        result = run_cli("submit", str(path), "-q")
        assert result.exit_code == 0, result.output
        (job_id,) = result.output.split()
        return job_id

    def job(self, job_id: str) -> Any:
        from service import db
        from service.models import Job

        with db.transaction(self.url) as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job

    def history(self, job_id: str) -> list[tuple[int, float, float | None]]:
        from service import db, jobs

        with db.transaction(self.url) as session:
            rows = jobs.history_rows([job_id], session=session)
            return [(r.epoch, r.train_loss, r.test_loss) for r in rows]

    def logs(self) -> str:
        return "\n".join(f"--- {w.log.name}\n{w.text()[-4000:]}" for w in self.workers)

    def dump_threads(self) -> None:
        """Have every live worker's main process log its threads' stacks (Celery's SIGUSR1)."""
        for worker in self.workers:
            if worker.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signal.SIGUSR1)
        time.sleep(1)

    def database_activity(self) -> str:
        """PostgreSQL's sessions on this cluster's database (read over ``inspect_url``)."""
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        url = make_url(self.inspect_url)
        if url.get_backend_name() != "postgresql":
            return ""
        engine = create_engine(url, connect_args={"connect_timeout": 5})
        try:
            with engine.connect() as connection:
                rows = connection.execute(
                    text(
                        "SELECT pid, state, wait_event_type, wait_event, client_port, "
                        "now() - state_change AS for, left(query, 60) AS query "
                        "FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid()"
                    )
                ).all()
            return "\n--- sessions\n" + "\n".join(str(tuple(row)) for row in rows)
        except Exception as exc:
            return f"\n--- sessions unavailable: {exc!r}"
        finally:
            engine.dispose()

    def wait(
        self,
        check: Callable[[], Any],
        *,
        timeout: float,
        what: str,
        detail: Callable[[], str] = str,
    ) -> Any:
        """wait_for, failing with ``detail()``, the workers' logs and their threads' stacks."""
        try:
            return wait_for(check, timeout=timeout, what=what, every=0.05)
        except pytest.fail.Exception:
            self.dump_threads()
            pytest.fail(
                f"timed out after {timeout * DEADLINE_SCALE:g}s waiting for {what}{detail()}"
                f"{self.database_activity()}\n{self.logs()}"
            )

    def wait_job(
        self, job_id: str, check: Callable[[Any], bool], *, timeout: float, what: str
    ) -> Any:
        seen: list[Any] = []

        def probe() -> Any:
            seen[:] = [self.job(job_id)]
            return seen[0] if check(seen[0]) else None

        def detail() -> str:
            if not seen:
                return ""
            job = seen[0]
            return (
                f"\nlast seen: state={job.state} attempts={job.attempts} worker={job.worker} "
                f"epochs_done={job.epochs_done} lease={job.lease_expires_at} "
                f"published={job.published_at} error={job.error}"
            )

        return self.wait(probe, timeout=timeout, what=f"job {job_id[:12]}: {what}", detail=detail)

    def wait_finished(self, job_id: str, *, timeout: float = 120) -> Any:
        return self.wait_job(
            job_id, lambda j: j.state in TERMINAL, timeout=timeout, what="a terminal state"
        )

    def wait_running(self, job_id: str, *, epochs: int = 1, timeout: float = 60) -> Any:
        """The job once it runs and has recorded (with a checkpoint) at least ``epochs``."""
        return self.wait_job(
            job_id,
            lambda j: j.state == "running" and j.epochs_done >= epochs,
            timeout=timeout,
            what=f"running with {epochs}+ epochs recorded",
        )

    def assert_as_uninterrupted(self, job_id: str, spec: Mapping[str, Any]) -> None:
        """Succeeded, every epoch once, and bit for bit the numbers of an unbroken run."""
        job = self.job(job_id)
        assert job.state == "succeeded", f"{job.state}: {job.error}\n{self.logs()}"
        expected, weights, bias = uninterrupted_run(spec)
        history = self.history(job_id)
        assert [e for e, _, _ in history] == list(range(1, spec["epochs"] + 1))
        assert history == expected
        assert job.epochs_done == spec["epochs"]
        assert job.result["weights"] == weights
        assert job.result["bias"] == bias

    def close(self) -> None:
        for worker in self.workers:
            worker.kill(signal.SIGKILL)
        for worker in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(10)
            worker.handle.close()


def fault_env(
    monkeypatch: pytest.MonkeyPatch, tmp: Path, *, database_url: str, broker_url: str
) -> dict[str, str]:
    """LRQ_* for the test process and its workers: short leases, frequent reconciling."""
    values = set_lrq_env(
        monkeypatch, tmp, database_url=database_url, broker_url=broker_url, max_attempts="3"
    )
    return {**os.environ, "PYTHONPATH": str(ROOT), **values}


@pytest.fixture
def make_cluster(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Callable[..., Cluster]]:
    """Build a cluster on an upgraded database URL and a broker URL; workers die at teardown."""
    from service import db

    made: list[Cluster] = []

    def make(database_url: str, broker_url: str) -> Cluster:
        db.upgrade(database_url)
        env = fault_env(monkeypatch, tmp_path, database_url=database_url, broker_url=broker_url)
        cluster = Cluster(env, tmp_path)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.close()


@pytest.fixture
def sqlite_cluster(
    make_cluster: Callable[..., Cluster], sqlite_url: str, redis_url: str
) -> Cluster:
    return make_cluster(sqlite_url, redis_url)


@pytest.fixture
def pg_cluster(make_cluster: Callable[..., Cluster], pg_url: str, redis_url: str) -> Cluster:
    return make_cluster(pg_url, redis_url)


# -- a TCP forwarder that can be cut --------------------------------------------------------


class Forwarder:
    """Forwards connections from (host, port) to a target; ``cut()`` drops every connection
    and stops listening until ``resume()``, as a restarting server or a broken link would."""

    def __init__(self, target: tuple[str, int], *, host: str = "127.0.0.1") -> None:
        self.target = target
        self.host = host
        self.port = free_port() if host == "127.0.0.1" else _free_port_on(host)
        self.listener: socket.socket | None = None
        self.sockets: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> Forwarder:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        listener.settimeout(0.2)
        self.listener = listener
        self.stopped.clear()
        self.thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self.thread.start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.settimeout(None)
                # Without it Nagle's algorithm and delayed acks add 40 ms to each round trip.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.sockets.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        selector = selectors.DefaultSelector()
        try:
            for sock in peers:
                selector.register(sock, selectors.EVENT_READ)
            while not self.stopped.is_set():
                for key, _ in selector.select(timeout=0.2):
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    chunk = source.recv(65536)
                    if not chunk:
                        return
                    peers[source].sendall(chunk)
        except (OSError, ValueError):
            return
        finally:
            selector.close()
            self._drop(a, b)

    def _drop(self, *socks: socket.socket) -> None:
        with self.lock:
            for sock in socks:
                self.sockets.discard(sock)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def cut(self) -> None:
        """Stop listening and reset every forwarded connection."""
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(5)
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        with self.lock:
            open_now = list(self.sockets)
        self._drop(*open_now)

    def resume(self) -> None:
        self.start()

    def close(self) -> None:
        self.cut()


def _free_port_on(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def forwarders() -> Iterator[Callable[..., Forwarder]]:
    """Make forwarders that are closed at teardown."""
    made: list[Forwarder] = []

    def make(target: tuple[str, int], *, host: str = "127.0.0.1") -> Forwarder:
        forwarder = Forwarder(target, host=host).start()
        made.append(forwarder)
        return forwarder

    yield make
    for forwarder in made:
        forwarder.close()


# -- a PostgreSQL instance of the test's own ------------------------------------------------


class PrivatePostgres:
    """initdb'd in a temporary directory, run as the postgres user when this is root, listening
    on ``host`` and trusting clients from ``clients`` (a CIDR) besides loopback."""

    def __init__(self, *, host: str = "127.0.0.1", clients: str | None = None) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")) or [
            p for p in [shutil.which("pg_ctl")] if p
        ]
        if not found:
            need("pg_ctl and initdb are not installed")
        self.bin = Path(found[-1]).parent
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                need("running PostgreSQL as root needs runuser")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.host = host
        self.clients = clients
        self.root = Path(tempfile.mkdtemp(prefix="lrq-pg-"))
        if self.as_user:
            shutil.chown(self.root, "postgres")
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@{host}:{self.port}/postgres"

    def _run(self, *argv: str, timeout: float = 60) -> None:
        done = subprocess.run(
            [*self.as_user, *argv], capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stdout}{done.stderr}")

    def init(self) -> PrivatePostgres:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U",
                  "postgres", "--no-sync", "--no-instructions")  # fmt: skip
        if self.clients:
            with (self.data / "pg_hba.conf").open("a") as hba:
                hba.write(f"host all all {self.clients} trust\n")
        return self

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses={self.host} -c fsync=off "
            "-c full_page_writes=off -c synchronous_commit=off"
        )
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options,
                  "-l", str(self.root / "log"), "-w", "-t", "30", "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "30",
                  "stop")  # fmt: skip

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def destroy(self) -> None:
        if self.running():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def make_private_postgres() -> Iterator[Callable[..., PrivatePostgres]]:
    """Start private PostgreSQL instances (see PrivatePostgres); destroyed at teardown."""
    made: list[PrivatePostgres] = []

    def make(*, host: str = "127.0.0.1", clients: str | None = None) -> PrivatePostgres:
        server = PrivatePostgres(host=host, clients=clients)
        made.append(server)
        try:
            server.init()
            server.start()
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            need(f"cannot start a private PostgreSQL: {exc}")
        return server

    yield make
    for server in made:
        server.destroy()


@pytest.fixture
def private_postgres(make_private_postgres: Callable[..., PrivatePostgres]) -> PrivatePostgres:
    return make_private_postgres()


def elapsed(since: float) -> float:
    return time.monotonic() - since


def report_recovery(what: str, seconds: float) -> None:
    """Print a recovery time (shown with pytest -s) for the lead to quote."""
    print(f"\nrecovery time: {what}: {seconds:.2f}s", flush=True)


# -- a worker in a terminal of its own --------------------------------------------------------


class TerminalWorker:
    """`lrq worker` with a pseudo-terminal as its controlling terminal, as run by hand: a
    Ctrl-C typed into the terminal reaches its foreground process group, as in a shell."""

    def __init__(self, env: Mapping[str, str], log: Path, *, name: str) -> None:
        import pty

        self.log = log
        self.handle = log.open("ab")
        self.master, slave = pty.openpty()
        argv = [sys.executable, "-m", "service.cli", "worker", "--queues=cpu",
                "--concurrency=1", "--loglevel=INFO", f"--name={name}"]  # fmt: skip
        self.process = subprocess.Popen(
            argv,
            env=dict(env),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=_take_terminal,
        )
        os.close(slave)
        self.reader = threading.Thread(target=self._copy, daemon=True)
        self.reader.start()

    def _copy(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # the terminal closed: every process on it exited
                return
            if not chunk or self.handle.closed:
                return
            self.handle.write(chunk)
            self.handle.flush()

    def type_ctrl_c(self) -> None:
        os.write(self.master, b"\x03")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> TerminalWorker:
        def ready() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"worker exited with {self.process.returncode}:\n{self.text()[-3000:]}")
            return " ready." in self.text()

        wait_for(ready, timeout=timeout, what=f"worker ready (log {self.log})")
        return self

    def pool_pids(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, check=False
        )
        return [int(p) for p in out.stdout.split()]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)


def _take_terminal() -> None:
    """In the child, after setsid: make the pty on stdin the session's controlling terminal."""
    import fcntl
    import termios

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
