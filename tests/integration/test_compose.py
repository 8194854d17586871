"""docker-compose.yml: its structure, and its services' own commands run here as processes."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from tests.support import free_port, need, run_cli, submit_ids, wait_for, wait_jobs

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"redis", "postgres", "migrate", "worker-cpu", "worker-gpu", "flower"}
#: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "KEY")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return document


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: {line!r} is not KEY=VALUE"
            pairs[key.strip()] = value.strip()
    return pairs


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """What docker compose makes of a value, given the variables of .env."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        value = variables.get(name)
        if op and op.endswith("?") and not value:
            raise ValueError(f"compose stops: {arg}")
        if op and op.endswith("-") and not value:
            return arg
        return value or ""

    return VARIABLE.sub(one, text.replace("$$", "\0")).replace("\0", "$")


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


def command_of(service: Mapping[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


def secrets_env() -> dict[str, str]:
    """.env as a person fills it in: .env.example with fresh passwords."""
    return env_example() | {
        "POSTGRES_PASSWORD": secrets.token_urlsafe(18),
        "REDIS_PASSWORD": secrets.token_urlsafe(18),
    }


def test_services_health_and_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == SERVICES

    redis = services["redis"]
    assert redis["image"] == "redis:7"
    shell, flag, script = command_of(redis)
    assert (shell, flag) == ("sh", "-c")
    redis_command = shlex.split(script)
    assert redis_command[:2] == ["exec", "redis-server"]
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"
    assert redis_command[redis_command.index("--maxmemory-policy") + 1] == "noeviction"
    assert redis_command[redis_command.index("--requirepass") + 1] == "$$REDIS_PASSWORD"
    assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    assert any(volume.endswith(":/data") for volume in redis["volumes"])

    postgres = services["postgres"]
    assert postgres["image"] == "postgres:16"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert set(compose["volumes"]) >= {
        v.split(":")[0] for v in redis["volumes"] + postgres["volumes"]
    }

    migrate = services["migrate"]
    assert command_of(migrate)[:2] == ["sh", "-c"]
    assert "lrq db upgrade" in command_of(migrate)[2]
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert migrate["restart"] == "no"

    for name, command in (
        ("worker-cpu", ["lrq", "worker", "--queues", "cpu", "--concurrency", "2"]),
        ("worker-gpu", ["lrq", "worker", "--gpus", "all"]),
    ):
        worker = services[name]
        assert command_of(worker) == command
        depends = worker["depends_on"]
        assert depends["migrate"] == {"condition": "service_completed_successfully"}
        assert depends["redis"] == {"condition": "service_healthy"}
        assert worker["environment"] == migrate["environment"]
        assert worker["environment"]["LRQ_TASK_EVENTS"] == "true"  # Flower shows tasks
    assert services["worker-cpu"]["image"] == migrate["image"]
    assert services["worker-cpu"]["build"] == migrate["build"]
    assert migrate["build"]["context"] == "."
    assert migrate["build"]["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"

    # The GPU worker has an image of its own, built with torch's CUDA wheels.
    gpu = services["worker-gpu"]
    assert gpu["image"] != migrate["image"]
    assert gpu["build"]["context"] == "."
    assert gpu["build"]["args"]["TORCH_REQUIRE_CUDA"] == "1"
    index = interpolate(gpu["build"]["args"]["TORCH_INDEX_URL"], env_example())
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", index), index
    assert interpolate(gpu["build"]["args"]["TORCH_INDEX_URL"], {}).startswith(
        "https://download.pytorch.org/whl/cu"
    )
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    assert gpu["profiles"] == ["gpu"]
    assert "deploy" not in services["worker-cpu"]

    flower = services["flower"]
    assert flower["image"].startswith("mher/flower")
    assert any(port.endswith(":5555") for port in flower["ports"])
    flower_command = " ".join(command_of(flower))
    assert 'celery --broker="$$LRQ_BROKER_URL" flower' in flower_command
    assert flower["environment"]["LRQ_BROKER_URL"] == migrate["environment"]["LRQ_BROKER_URL"]


def test_environment_and_secrets_come_from_env_file(compose: dict[str, Any]) -> None:
    environment = compose["services"]["migrate"]["environment"]
    assert environment == compose["x-common"]["environment"]
    database = environment["LRQ_DATABASE_URL"]
    assert VARIABLE.sub("PW", database) == "postgresql+psycopg://lrq:PW@postgres:5432/lrq"
    assert [m.group(1) for m in VARIABLE.finditer(database)] == ["POSTGRES_PASSWORD"]
    broker = environment["LRQ_BROKER_URL"]
    assert VARIABLE.sub("PW", broker) == "redis://:PW@redis:6379/0"
    assert [m.group(1) for m in VARIABLE.finditer(broker)] == ["REDIS_PASSWORD"]

    placeholders = env_example()
    # No password ships with a value: compose stops until .env sets a real one.
    assert placeholders["POSTGRES_PASSWORD"] == "" and placeholders["REDIS_PASSWORD"] == ""
    assert "change-me" not in (ROOT / ".env.example").read_text().replace('"change-me"', "")
    # $$ is an escaped $, left to the container's shell: not a variable of .env.
    used = {
        m.group(1) for text in strings(compose) for m in VARIABLE.finditer(text.replace("$$", ""))
    }
    assert used <= set(placeholders), used - set(placeholders)
    for text in strings(compose):
        if "://" in text:
            password = make_url(VARIABLE.sub("VAR", text)).password if "@" in text else None
            assert password in (None, "VAR"), text
    for service in compose["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if any(word in key for word in (*SECRET_WORDS, "AUTH")):
                assert VARIABLE.fullmatch(str(value)), f"{key}: {value!r} is not a ${{VAR}}"

    postgres = compose["services"]["postgres"]["environment"]
    reference = VARIABLE.fullmatch(postgres["POSTGRES_PASSWORD"])
    assert reference is not None and reference.group(1) == "POSTGRES_PASSWORD"
    assert postgres["POSTGRES_USER"] == "lrq" and postgres["POSTGRES_DB"] == "lrq"
    for url, variable in ((database, "POSTGRES_PASSWORD"), (broker, "REDIS_PASSWORD")):
        with pytest.raises(ValueError, match=rf"compose stops: set {variable} in \.env"):
            interpolate(url, placeholders)  # .env.example copied as it is
        with pytest.raises(ValueError, match=rf"compose stops: set {variable} in \.env"):
            interpolate(url, {})
    redis_env = compose["services"]["redis"]["environment"]
    assert redis_env["REDIS_PASSWORD"] == redis_env["REDISCLI_AUTH"]
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


def dockerfile_instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined as docker joins them."""
    joined = re.sub(r"\\\n", "", (ROOT / "Dockerfile").read_text())
    return [
        line.strip()
        for line in joined.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_dockerfile_builds_one_image_with_a_swappable_torch() -> None:
    lines = dockerfile_instructions()
    assert lines[0] == "FROM python:3.11-slim"
    assert any(line.startswith("ARG TORCH_INDEX_URL=") for line in lines)
    assert "ARG TORCH_REQUIRE_CUDA=0" in lines
    text = "\n".join(lines)
    assert '--index-url "${TORCH_INDEX_URL}"' in text
    assert text.index("torch==") < text.index("TORCH_REQUIRE_CUDA}") < text.index("pip install .")
    assert any(line.startswith("USER ") and line != "USER root" for line in lines)


def test_the_gpu_image_build_fails_on_a_torch_without_cuda(tmp_path: Path) -> None:
    """The build's CUDA check, run here with this machine's torch (a CPU build)."""
    import torch

    [check] = [line for line in dockerfile_instructions() if "TORCH_REQUIRE_CUDA}" in line]
    script = check.removeprefix("RUN ")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "python"  # `python` in the image: this machine's, with its torch
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    runs = {
        flag: subprocess.run(
            ["sh", "-c", script],
            env={**env, "TORCH_REQUIRE_CUDA": flag},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        for flag in ("0", "1")
    }
    assert runs["0"].returncode == 0, runs["0"].stderr
    if torch.version.cuda is None:
        assert runs["1"].returncode != 0
        assert "this torch has no CUDA build" in runs["1"].stderr
    else:
        assert runs["1"].returncode == 0, runs["1"].stderr


def compose_env(
    compose: dict[str, Any],
    service: str,
    variables: Mapping[str, str],
    *,
    database_url: str | None = None,
    broker_url: str | None = None,
    home: Path,
    bin_dir: Path | None = None,
) -> dict[str, str]:
    """The service's environment with the compose hosts swapped for this machine's servers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LRQ_")}
    for key, value in compose["services"][service]["environment"].items():
        value = interpolate(str(value), variables)
        if key == "LRQ_DATABASE_URL":
            url = make_url(value)
            assert (url.host, url.port) == ("postgres", 5432)
            assert url.password == variables["POSTGRES_PASSWORD"]
            value = database_url or value
        elif key == "LRQ_BROKER_URL":
            assert value.startswith(f"redis://:{variables['REDIS_PASSWORD']}@redis:6379/")
            value = broker_url or value
        env[key] = value
    env["LRQ_HOME"] = str(home)
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return env


def lrq_argv(command: list[str]) -> list[str]:
    assert command[0] == "lrq"
    return [sys.executable, "-m", "service.cli", *command[1:]]


def lrq_on_path(tmp_path: Path) -> Path:
    """A directory whose `lrq` is this checkout's, for commands that run through a shell."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "lrq"
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m service.cli "$@"\n')
    shim.chmod(0o755)
    return bin_dir


def swap_host(url: str, host: str, port: int) -> str:
    """The URL with another host and port; user, password and database kept."""
    return make_url(url).set(host=host, port=port).render_as_string(hide_password=False)


class ComposeRedis:
    """The redis service's own command, run here on a free port."""

    def __init__(self, compose: dict[str, Any], variables: Mapping[str, str], workdir: Path):
        if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
            need("redis-server and redis-cli are not installed")
        service = compose["services"]["redis"]
        self.env = {**os.environ} | {
            key: interpolate(str(value), variables) for key, value in service["environment"].items()
        }
        self.port = free_port()
        shell, flag, script = command_of(service)
        script = interpolate(script, variables)
        # Only where it listens and keeps its files differ from the container.
        script += f" --port {self.port} --bind 127.0.0.1 --dir {shlex.quote(str(workdir))}"
        _, client, *check = service["healthcheck"]["test"]
        self.healthcheck = [client, "-p", str(self.port), *check]
        self.process = subprocess.Popen(
            [shell, flag, script],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(self.healthy, timeout=30, what="the compose redis answering its healthcheck")

    def healthy(self) -> bool:
        assert self.process.poll() is None, "redis-server exited"
        done = subprocess.run(
            self.healthcheck, env=self.env, capture_output=True, text=True, check=False
        )
        return done.stdout.strip() == "PONG"

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture
def compose_redis(
    compose: dict[str, Any], tmp_path: Path
) -> Iterator[tuple[ComposeRedis, dict[str, str]]]:
    variables = secrets_env()
    server = ComposeRedis(compose, variables, tmp_path)
    yield server, variables
    server.stop()


def test_redis_requires_the_password_from_env(
    compose_redis: tuple[ComposeRedis, dict[str, str]],
) -> None:
    import redis

    server, variables = compose_redis
    anonymous = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    no_auth = {k: v for k, v in server.env.items() if k != "REDISCLI_AUTH"}
    done = subprocess.run(
        server.healthcheck, env=no_auth, capture_output=True, text=True, check=False
    )
    assert "NOAUTH" in done.stdout + done.stderr
    password = variables["REDIS_PASSWORD"]
    client = redis.Redis(host="127.0.0.1", port=server.port, password=password, socket_timeout=5)
    assert client.ping()


def run_migrate(
    compose: dict[str, Any], env: Mapping[str, str], variables: Mapping[str, str]
) -> subprocess.Popen[str]:
    """The migrate service's command (a shell loop around `lrq db upgrade`) as a process."""
    return subprocess.Popen(
        [interpolate(part, variables) for part in command_of(compose["services"]["migrate"])],
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_migrate_retries_until_the_database_answers(
    compose: dict[str, Any], pg_url: str, tmp_path: Path
) -> None:
    """The database still starting: migrate waits for it with back-off, then upgrades."""
    from service import db
    from tests.faults.conftest import Forwarder

    real = make_url(pg_url)
    late = Forwarder((real.host or "127.0.0.1", real.port or 5432))  # not listening yet
    variables = secrets_env()
    env = compose_env(
        compose,
        "migrate",
        variables,
        database_url=swap_host(pg_url, "127.0.0.1", late.port),
        home=tmp_path,
        bin_dir=lrq_on_path(tmp_path),
    )
    process = run_migrate(compose, env, variables)
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.extend(process.stderr or []), daemon=True)
    reader.start()
    try:
        wait_for(
            lambda: sum("retrying in" in line for line in errors) >= 2 or process.poll(),
            timeout=60,
            what="two retries of lrq db upgrade",
        )
        assert process.poll() is None, "".join(errors)
        late.start()
        process.wait(timeout=180)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        late.close()
    reader.join(10)
    text = "".join(errors)
    assert process.returncode == 0, text
    assert "retrying in 1s" in text and "retrying in 2s" in text
    assert "Traceback" not in text
    assert db.current_revision(pg_url) == db.head_revision(pg_url)


def test_migrate_stops_at_once_on_the_placeholder_password(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """Bad input is not retried; the old .env.example's password is refused by lrq itself."""
    variables = secrets_env() | {"POSTGRES_PASSWORD": "change-me"}
    env = compose_env(compose, "migrate", variables, home=tmp_path, bin_dir=lrq_on_path(tmp_path))
    process = run_migrate(compose, env, variables)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr
    assert stderr.splitlines() == [
        "error: LRQ_DATABASE_URL: the password is the placeholder 'change-me': set a real one "
        "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')"
    ]
    assert stdout == ""


class EventWatcher:
    """Celery events on the broker, as Flower receives them."""

    def __init__(self, broker_url: str) -> None:
        from celery import Celery

        self.app = Celery("watcher", broker=broker_url, set_as_current=False)
        self.seen: list[str] = []
        self.receiver: Any = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with self.app.connection_for_read() as connection:
            self.receiver = self.app.events.Receiver(
                connection, handlers={"*": lambda event: self.seen.append(event["type"])}
            )
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(10)


def test_migrate_then_worker_cpu_run_a_job(
    compose: dict[str, Any],
    compose_redis: tuple[ComposeRedis, dict[str, str]],
    pg_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service import db

    redis_server, variables = compose_redis
    services = compose["services"]
    bin_dir = lrq_on_path(tmp_path)
    env = compose_env(
        compose, "migrate", variables, database_url=pg_url, home=tmp_path, bin_dir=bin_dir
    )
    migrated = run_migrate(compose, env, variables)
    stdout, stderr = migrated.communicate(timeout=180)
    assert migrated.returncode == 0, stderr
    assert db.current_revision(pg_url) == db.head_revision(pg_url)
    assert stdout.strip().endswith(f"at revision {db.head_revision(pg_url)}")

    env = compose_env(compose, "worker-cpu", variables, database_url=pg_url, home=tmp_path)
    broker_url = swap_host(env["LRQ_BROKER_URL"], "127.0.0.1", redis_server.port)
    env["LRQ_BROKER_URL"] = broker_url  # the password from .env, the host from here
    for key in ("LRQ_DATABASE_URL", "LRQ_BROKER_URL", "LRQ_HOME", "LRQ_TASK_EVENTS"):
        monkeypatch.setenv(key, env[key])
    watcher = EventWatcher(broker_url)
    log = tmp_path / "worker-cpu.log"
    with log.open("wb") as handle:
        worker = subprocess.Popen(
            lrq_argv(command_of(services["worker-cpu"])),
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for(
                lambda: worker.poll() is not None or " ready." in log.read_text(),
                timeout=60,
                what="worker-cpu ready",
            )
            assert worker.poll() is None, log.read_text()
            ids = submit_ids(str(ROOT / "examples" / "tutorial_numpy.yaml"), "--set", "epochs=50")
            ids += submit_ids(str(ROOT / "examples" / "sweep.yaml"), "--set", "epochs=5")
            found = wait_jobs(pg_url, ids, timeout=60)
            wait_for(
                lambda: watcher.seen.count("task-succeeded") >= len(ids),
                timeout=60,
                what=f"task-succeeded events (seen {sorted(set(watcher.seen))})",
            )
        finally:
            watcher.stop()
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
                try:
                    worker.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait(10)
    text = log.read_text()
    assert [(job.state, job.epochs_done) for job in found] == [("succeeded", 50), ("succeeded", 5)]
    assert "concurrency: 2 (prefork)" in text and ".> cpu " in text
    assert "task events: ON" in text
    assert {"task-received", "task-started", "task-succeeded"} <= set(watcher.seen)
    assert variables["REDIS_PASSWORD"] not in text  # the worker's banner masks it
    status = run_cli("status", "--format", "json")
    assert [row["state"] for row in json.loads(status.stdout)] == ["succeeded"] * 2
