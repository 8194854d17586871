"""docker-compose.yml: its structure, and its services' own commands run here as processes."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from tests.support import run_cli, submit_ids, wait_for, wait_jobs

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


def test_services_health_and_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == SERVICES

    redis = services["redis"]
    assert redis["image"] == "redis:7"
    redis_command = command_of(redis)
    assert redis_command[0] == "redis-server"
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"
    assert redis_command[redis_command.index("--maxmemory-policy") + 1] == "noeviction"
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
    assert command_of(migrate) == ["lrq", "db", "upgrade"]
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
        # One image for lrq, built here, in every lrq service.
        assert worker["image"] == migrate["image"] and worker["build"] == migrate["build"]
        assert worker["environment"] == migrate["environment"]
    assert migrate["build"]["context"] == "."
    assert "TORCH_INDEX_URL" in migrate["build"]["args"]

    [device] = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
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
    assert environment["LRQ_BROKER_URL"] == "redis://redis:6379/0"
    database = environment["LRQ_DATABASE_URL"]
    assert VARIABLE.sub("PW", database) == "postgresql+psycopg://lrq:PW@postgres:5432/lrq"
    assert [m.group(1) for m in VARIABLE.finditer(database)] == ["POSTGRES_PASSWORD"]

    placeholders = env_example()
    assert "POSTGRES_PASSWORD" in placeholders
    used = {m.group(1) for text in strings(compose) for m in VARIABLE.finditer(text)}
    assert used <= set(placeholders), used - set(placeholders)
    for text in strings(compose):
        # A secret is only ever a reference, and no placeholder value is written in.
        assert not any(len(v) > 3 and v in text for k, v in placeholders.items() if "PASS" in k)
        if "://" in text:
            password = make_url(VARIABLE.sub("VAR", text)).password if "@" in text else None
            assert password in (None, "VAR"), text
    for service in compose["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if any(word in key for word in SECRET_WORDS):
                assert VARIABLE.fullmatch(str(value)), f"{key}: {value!r} is not a ${{VAR}}"

    postgres = compose["services"]["postgres"]["environment"]
    reference = VARIABLE.fullmatch(postgres["POSTGRES_PASSWORD"])
    assert reference is not None and reference.group(1) == "POSTGRES_PASSWORD"
    assert postgres["POSTGRES_USER"] == "lrq" and postgres["POSTGRES_DB"] == "lrq"
    with pytest.raises(ValueError, match=r"compose stops: set POSTGRES_PASSWORD in \.env"):
        interpolate(database, {})
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


def test_dockerfile_builds_one_image_with_a_swappable_torch() -> None:
    lines = [
        line.strip()
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines[0] == "FROM python:3.11-slim"
    assert any(line.startswith("ARG TORCH_INDEX_URL=") for line in lines)
    text = "\n".join(lines)
    assert '--index-url "${TORCH_INDEX_URL}"' in text
    assert text.index("torch==") < text.index("pip install .")
    assert any(line.startswith("USER ") and line != "USER root" for line in lines)


def compose_env(
    compose: dict[str, Any], service: str, *, database_url: str, broker_url: str, home: Path
) -> dict[str, str]:
    """The service's environment with the compose hosts swapped for this machine's servers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LRQ_")}
    variables = env_example()
    for key, value in compose["services"][service]["environment"].items():
        value = interpolate(str(value), variables)
        if key == "LRQ_DATABASE_URL":
            url = make_url(value)
            assert (url.host, url.port, url.password) == ("postgres", 5432, "change-me")
            value = database_url
        elif key == "LRQ_BROKER_URL":
            assert value.startswith("redis://redis:6379/")
            value = broker_url
        env[key] = value
    env["LRQ_HOME"] = str(home)
    return env


def lrq_argv(command: list[str]) -> list[str]:
    assert command[0] == "lrq"
    return [sys.executable, "-m", "service.cli", *command[1:]]


def test_migrate_then_worker_cpu_run_a_job(
    compose: dict[str, Any],
    pg_url: str,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service import db

    services = compose["services"]
    env = compose_env(compose, "migrate", database_url=pg_url, broker_url=redis_url, home=tmp_path)
    migrated = subprocess.run(
        lrq_argv(command_of(services["migrate"])),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert migrated.returncode == 0, migrated.stderr
    assert db.current_revision(pg_url) == db.head_revision(pg_url)
    assert migrated.stdout.strip().endswith(f"at revision {db.head_revision(pg_url)}")

    env = compose_env(
        compose, "worker-cpu", database_url=pg_url, broker_url=redis_url, home=tmp_path
    )
    for key in ("LRQ_DATABASE_URL", "LRQ_BROKER_URL", "LRQ_HOME"):
        monkeypatch.setenv(key, env[key])
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
        finally:
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
    status = run_cli("status", "--format", "json")
    assert [row["state"] for row in json.loads(status.stdout)] == ["succeeded"] * 2
