"""Security: workers take JSON only, passwords stay out of every output and log, a TLS broker is
always verified, and resource limits refuse at submit."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import pickle
import shutil
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import (
    PasswordRedisServer,
    RedisServer,
    WorkerProcess,
    free_port,
    need,
    reset_caches,
    run_cli,
    set_lrq_env,
    state_counts,
    wait_for,
)

SPEC: dict[str, Any] = {
    "name": "small",
    "data": {"synthetic": {"n_samples": 50, "n_features": 2, "seed": 3}},
    "backend": "numpy",
    "dtype": "float64",
    "optimizer": {"lr": 0.01},
    "epochs": 5,
}
GOOD_CSV = b"X1,X2,Y\n1,2,5\n2,1,4\n3,3,9\n4,1,6\n0,2,4\n5,5,15\n"


def write_spec(directory: Path, document: dict[str, Any] | None = None) -> Path:
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump(document or SPEC))
    return path


def use_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **values: str) -> dict[str, str]:
    """LRQ_* settings for a SQLite database under tmp_path; returns the full environment."""
    from service import db

    url = values.pop("database_url", f"sqlite:///{tmp_path / 'lrq.db'}")
    set_lrq_env(monkeypatch, tmp_path, database_url=url, **values)
    if url.startswith("sqlite"):
        db.upgrade(url)
        db.dispose_all()
        reset_caches()
    return dict(os.environ)


def job_state(url: str, job_id: str) -> str:
    from service import db, jobs

    with db.transaction(url) as session:
        (job,) = jobs.find_jobs(session=session, ids=[job_id])
        state = job.state
    db.dispose_all()
    return state


def submit_one(spec_path: Path) -> str:
    result = run_cli("submit", str(spec_path), "-q")
    assert result.exit_code == 0, result.output
    (job_id,) = result.stdout.split()
    return job_id


def wait_succeeded(url: str, job_id: str, worker: WorkerProcess, timeout: float = 60) -> None:
    def done() -> bool:
        state = job_state(url, job_id)
        if state not in ("queued", "running"):
            assert state == "succeeded", f"job {state}; worker log:\n{worker.text()[-3000:]}"
        return state == "succeeded"

    wait_for(done, timeout=timeout, what=f"job {job_id[:8]} to succeed (log {worker.log})")


# -- JSON only ----------------------------------------------------------------------------------


class Touch:
    """Unpickling this creates a file: what an attacker's pickle would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def pickled_message(template: dict[str, Any], sentinel: Path) -> dict[str, Any]:
    """A kombu Redis message like the template, but with a pickle body whose loading runs code."""
    message: dict[str, Any] = json.loads(json.dumps(template))
    task_id = str(uuid.uuid4())
    body = pickle.dumps(((Touch(sentinel),), {}, {"callbacks": None, "errbacks": None}))
    message["body"] = base64.b64encode(body).decode()
    message["content-type"] = "application/x-python-serialize"
    message["content-encoding"] = "binary"
    message["headers"].update(id=task_id, root_id=task_id, argsrepr="(Touch(),)")
    message["properties"].update(correlation_id=task_id, delivery_tag=str(uuid.uuid4()))
    return message


def test_a_worker_refuses_a_pickled_message_and_its_payload_never_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_url: str
) -> None:
    import redis

    from service.queue import get_app, publish

    env = use_env(monkeypatch, tmp_path, broker_url=redis_url)
    url = env["LRQ_DATABASE_URL"]
    client = redis.Redis.from_url(redis_url)
    sentinel = tmp_path / "payload-ran"

    # The envelope of a real message, as publish() writes it onto the 'cpu' list.
    publish(get_app(), [("template", "cpu")], timeout=2)
    raw = client.rpop("cpu")
    assert isinstance(raw, bytes)
    template = json.loads(raw)
    assert template["content-type"] == "application/json"
    assert template["properties"]["body_encoding"] == "base64"
    assert json.loads(base64.b64decode(template["body"]))[0] == ["template"]
    assert template["headers"]["task"] == "lrq.run_job"

    message = pickled_message(template, sentinel)
    pickle.loads(base64.b64decode(message["body"]))  # the payload is live
    assert sentinel.exists()
    sentinel.unlink()

    client.lpush("cpu", json.dumps(message))
    job_id = submit_one(write_spec(tmp_path))
    queued = [json.loads(raw) for raw in client.lrange("cpu", 0, -1)]
    # Workers pop from the right: the pickled message is taken first.
    assert [m["content-type"] for m in queued] == [
        "application/json",
        "application/x-python-serialize",
    ]

    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        wait_succeeded(url, job_id, worker)
        wait_for(
            lambda: client.llen("cpu") == 0 and client.hlen("unacked") == 0,
            timeout=30,
            what="the queue to be empty and nothing unacked",
        )
    finally:
        worker.stop()
    log = worker.text()
    assert not sentinel.exists(), log[-3000:]
    refused = (
        "Received invalid task message: Refusing to deserialize untrusted content of type "
        "pickle (application/x-python-serialize)"
    )
    assert refused in log, log[-3000:]


# -- passwords ----------------------------------------------------------------------------------

PASSWORD = "Redis0pw" + uuid.uuid4().hex[:12]


def assert_hidden(secret: str, *texts: str) -> None:
    for text in texts:
        assert secret not in text, text[-3000:]


def test_redis_password_works_and_never_shows(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    server = PasswordRedisServer(tmp_path / "redis", password=PASSWORD)
    server.start()
    worker: WorkerProcess | None = None
    try:
        env = use_env(monkeypatch, tmp_path, broker_url=server.url)
        url = env["LRQ_DATABASE_URL"]
        masked = f"redis://:***@127.0.0.1:{server.port}/0"
        spec = write_spec(tmp_path)

        info = run_cli("info")
        assert info.exit_code == 0, info.output
        assert f"broker    {masked}" in info.stdout
        assert "queues    cpu 0, gpu 0" in info.stdout  # it did authenticate
        submitted = run_cli("submit", str(spec))
        assert submitted.exit_code == 0, submitted.output
        job_id = submitted.stdout.split()[0]
        assert server.client().llen("cpu") == 1

        running = worker = WorkerProcess(env, tmp_path / "worker.log")
        running.wait_ready()
        wait_succeeded(url, job_id, running)

        # A wrong password: refused, and neither password is shown.
        wrong = f"redis://:Wrong{PASSWORD}@127.0.0.1:{server.port}/0"
        monkeypatch.setenv("LRQ_BROKER_URL", wrong)
        refused = run_cli("submit", str(spec))
        assert refused.exit_code == 1
        assert f"error: broker {masked} unreachable" in refused.stderr
        wrong_info = run_cli("info")
        assert "queues    unavailable" in wrong_info.stdout
        assert_hidden(PASSWORD, refused.output, wrong_info.output)

        # Redis down: the running worker and a submit report it without the password.
        monkeypatch.setenv("LRQ_BROKER_URL", server.url)
        server.stop()
        down = run_cli("submit", str(spec))
        assert down.exit_code == 1
        assert f"error: broker {masked} unreachable" in down.stderr
        down_info = run_cli("info")
        wait_for(
            lambda: "Cannot connect to redis" in running.text(),
            timeout=30,
            what="the worker to notice Redis went away",
        )
        assert_hidden(PASSWORD, submitted.output, info.output, down.output, down_info.output)
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
    assert worker is not None
    log = worker.text()
    assert ":**@127.0.0.1" in log  # Celery's banner, masked
    assert_hidden(PASSWORD, log)


def test_a_worker_with_a_wrong_redis_password_never_logs_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    server = PasswordRedisServer(tmp_path / "redis", password=PASSWORD)
    server.start()
    wrong = f"Wrong{PASSWORD}"
    env = use_env(monkeypatch, tmp_path, broker_url=f"redis://:{wrong}@127.0.0.1:{server.port}/0")
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        wait_for(
            lambda: (
                "invalid username-password pair" in worker.text() or "WRONGPASS" in worker.text()
            ),
            timeout=30,
            what="the worker to report the refused password",
        )
    finally:
        worker.stop()
        server.stop()
    assert_hidden(PASSWORD, worker.text())
    assert_hidden(wrong, worker.text())


@pytest.fixture
def pg_role(pg_url: str) -> Iterator[str]:
    """pg_url for a role of its own with a password (the role owns the test database)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    role = f"lrq_role_{uuid.uuid4().hex[:10]}"
    admin_url = make_url(pg_url)
    database = admin_url.database
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{PASSWORD}'"))
        conn.execute(text(f'ALTER DATABASE "{database}" OWNER TO "{role}"'))
    yield admin_url.set(username=role, password=PASSWORD).render_as_string(hide_password=False)
    reset_caches()
    with admin.connect() as conn:
        conn.execute(text(f'REASSIGN OWNED BY "{role}" TO CURRENT_USER'))
        conn.execute(text(f'DROP OWNED BY "{role}"'))
        conn.execute(text(f'DROP ROLE "{role}"'))
    admin.dispose()


def run_apart(env: dict[str, str], *commands: tuple[str, ...]) -> list[tuple[int, str, str]]:
    """`lrq` commands as separate processes (run side by side), so an unhandled error would
    print its real traceback; (exit code, stdout, stderr) for each."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in commands
    ]
    out = []
    for process in processes:
        try:
            stdout, stderr = process.communicate(timeout=60)
        finally:
            process.kill()
        out.append((process.returncode, stdout, stderr))
    return out


def test_postgresql_password_never_shows(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pg_role: str, redis_url: str
) -> None:
    from sqlalchemy.engine import make_url

    role_url = make_url(pg_role)
    masked = role_url.render_as_string(hide_password=True)
    assert "***" in masked
    env = use_env(monkeypatch, tmp_path, database_url=pg_role, broker_url=redis_url)
    outputs: list[str] = []

    no_schema = run_cli("status")
    assert no_schema.exit_code == 1
    assert f"error: the database {masked} has no lrq schema" in no_schema.stderr
    current = run_cli("db", "current")
    assert current.exit_code == 0, current.output
    assert current.stdout.startswith(f"{masked}: None (head ")
    upgraded = run_cli("db", "upgrade")
    assert upgraded.exit_code == 0, upgraded.output
    assert masked in upgraded.stdout
    spec = write_spec(tmp_path)
    submitted = run_cli("submit", str(spec))
    assert submitted.exit_code == 0, submitted.output
    info = run_cli("info")
    assert f"database  {masked}" in info.stdout
    assert "jobs      queued 1" in info.stdout
    outputs += [no_schema.output, current.output, upgraded.output, submitted.output, info.output]

    # Unreachable servers and missing databases, in a fresh process each.
    closed_port = role_url.set(port=free_port()).render_as_string(hide_password=False)
    no_database = role_url.set(database="lrq_no_such_db").render_as_string(hide_password=False)
    commands = [("status",), ("info",), ("db", "current"), ("submit", str(spec))]
    for broken in (closed_port, no_database):
        results = run_apart({**env, "LRQ_DATABASE_URL": broken}, *commands)
        for args, (code, stdout, stderr) in zip(commands, results, strict=True):
            if args == ("info",):
                assert code == 0, (stdout, stderr)
                assert "jobs      unavailable" in stdout
            else:
                assert code == 1, (args, stdout, stderr)
                assert f"error: database {make_url(broken).render_as_string()}: " in stderr
            outputs += [stdout, stderr]
    for text in outputs:
        assert PASSWORD not in text, text[-3000:]
        assert "Traceback" not in text, text[-3000:]


# -- TLS ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ca_file", ["", "/etc/ssl/private-ca.pem"])
@pytest.mark.parametrize(
    "url",
    [
        "rediss://broker.example:6380/0",
        "rediss://:secret@broker.example:6380/0",
        "rediss://broker.example:6380/0?ssl_cert_reqs=required",
        "rediss://broker.example:6380/0?ssl_cert_reqs=CERT_REQUIRED",
    ],
)
def test_a_rediss_broker_is_always_verified(url: str, ca_file: str) -> None:
    from service.queue import _redis_client, make_app
    from service.settings import Settings

    app = make_app(Settings(broker_url=url, broker_ca_file=ca_file))
    expected: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if ca_file:
        expected["ssl_ca_certs"] = ca_file
    assert app.conf.broker_use_ssl == expected
    # What kombu will use, after its own reading of the URL.
    assert app.connection_for_write().ssl == expected
    assert "ssl_" not in app.conf.broker_url
    pool = _redis_client(app).connection_pool.connection_kwargs
    assert pool["ssl_cert_reqs"] == "required"
    assert pool.get("ssl_ca_certs") == (ca_file or None)


@pytest.mark.parametrize(
    "query",
    [
        "ssl_cert_reqs=none",
        "ssl_cert_reqs=CERT_NONE",
        "ssl_cert_reqs=optional",
        "ssl_check_hostname=false",
        "ssl_ca_certs=/tmp/other.pem",
    ],
)
def test_tls_options_in_the_url_cannot_weaken_verification(
    query: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from service.errors import BrokerError
    from service.queue import make_app
    from service.settings import Settings

    url = f"rediss://broker.example:6380/0?{query}"
    with pytest.raises(BrokerError, match=f"LRQ_BROKER_URL: {query} is not allowed"):
        make_app(Settings(broker_url=url))
    use_env(monkeypatch, tmp_path, broker_url=url)
    result = run_cli("info")
    assert result.exit_code == 1
    assert f"error: LRQ_BROKER_URL: {query} is not allowed" in result.stderr


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_certificates(directory: Path) -> dict[str, Path]:
    """A private CA, a server certificate for localhost, and one for another name."""
    directory.mkdir()
    paths = {name: directory / name for name in ("ca.crt", "ca.key")}
    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *curve, "-keyout", str(paths["ca.key"]), "-out",
            str(paths["ca.crt"]), "-days", "2", "-subj", "/CN=lrq test CA")  # fmt: skip
    for name, san in (("server", "DNS:localhost,IP:127.0.0.1"), ("other", "DNS:other.invalid")):
        key, csr, crt = (directory / f"{name}.{suffix}" for suffix in ("key", "csr", "crt"))
        extensions = directory / f"{name}.ext"
        extensions.write_text(f"subjectAltName={san}\n")
        openssl("req", *curve, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", str(csr), "-CA", str(paths["ca.crt"]), "-CAkey",
                str(paths["ca.key"]), "-CAcreateserial", "-out", str(crt), "-days", "2",
                "-extfile", str(extensions))  # fmt: skip
        paths[f"{name}.key"], paths[f"{name}.crt"] = key, crt
    return paths


class TlsRedisServer(RedisServer):
    """A redis-server that speaks only TLS, with the given certificate."""

    def __init__(
        self, workdir: Path, *, cert: Path, key: Path, ca: Path, check_hostname: bool = True
    ) -> None:
        super().__init__(workdir)
        self.cert, self.key, self.ca = cert, key, ca
        self.check_hostname = check_hostname

    @property
    def url(self) -> str:
        return f"rediss://localhost:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [self.binary, "--port", "0", "--tls-port", str(self.port), "--bind", self.bind]
        argv += ["--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key)]
        argv += ["--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "no"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        def up() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                output = self.process.stdout.read() if self.process.stdout else b""
                reason = output.decode(errors="replace").strip()[-300:]
                pytest.skip(f"this redis-server cannot serve TLS: {reason}")
            return self.ping()

        wait_for(up, timeout=10, what=f"TLS redis on port {self.port}")

    def client(self) -> Any:
        import redis

        return redis.Redis(
            host=self.bind,
            port=self.port,
            ssl=True,
            ssl_ca_certs=str(self.ca),
            ssl_check_hostname=self.check_hostname,
            socket_timeout=5,
        )

    def ping(self) -> bool:
        import redis

        try:
            return bool(self.client().ping())
        except (redis.RedisError, OSError):
            return False


@pytest.fixture
def certificates(tmp_path: Path) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        need("the openssl command is not installed")
    return make_certificates(tmp_path / "tls")


def test_a_tls_broker_is_verified_against_the_ca_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, certificates: dict[str, Path]
) -> None:
    server = TlsRedisServer(
        tmp_path / "redis",
        cert=certificates["server.crt"],
        key=certificates["server.key"],
        ca=certificates["ca.crt"],
    )
    server.start()
    worker: WorkerProcess | None = None
    try:
        env = use_env(monkeypatch, tmp_path, broker_url=server.url)
        spec = write_spec(tmp_path)

        unverified = run_cli("submit", str(spec), "-q")
        assert unverified.exit_code == 1
        assert "certificate verify failed" in unverified.stderr
        assert server.client().llen("cpu") == 0

        monkeypatch.setenv("LRQ_BROKER_CA_FILE", str(certificates["ca.crt"]))
        job_id = submit_one(spec)
        assert server.client().llen("cpu") == 1
        info = run_cli("info")
        assert "queues    cpu 1, gpu 0" in info.stdout

        env["LRQ_BROKER_CA_FILE"] = str(certificates["ca.crt"])
        worker = WorkerProcess(env, tmp_path / "worker.log")
        worker.wait_ready()
        wait_succeeded(env["LRQ_DATABASE_URL"], job_id, worker)
        # The first submit recorded its job; the worker's reconciler sent it over TLS too.
        first = unverified.stdout.split()[0]
        wait_succeeded(env["LRQ_DATABASE_URL"], first, worker)
    finally:
        if worker is not None:
            worker.stop()
        server.stop()


def test_a_tls_broker_with_another_name_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, certificates: dict[str, Path]
) -> None:
    server = TlsRedisServer(
        tmp_path / "redis",
        cert=certificates["other.crt"],
        key=certificates["other.key"],
        ca=certificates["ca.crt"],
        check_hostname=False,
    )
    server.start()
    try:
        use_env(
            monkeypatch,
            tmp_path,
            broker_url=f"rediss://127.0.0.1:{server.port}/0",
            broker_ca_file=str(certificates["ca.crt"]),
        )
        result = run_cli("submit", str(write_spec(tmp_path)))
        assert result.exit_code == 1
        assert "certificate is not valid for '127.0.0.1'" in result.stderr
        assert server.client().llen("cpu") == 0
    finally:
        server.stop()


# -- resource limits ------------------------------------------------------------------------------

LIMITS = {
    "max_rows": "1000",
    "max_features": "5",
    "max_epochs": "100",
    "max_row_epochs": "20000",
    "max_dataset_bytes": "8192",
    "max_grid_points": "4",
}
WIDE_CSV = (
    ",".join([*(f"X{i}" for i in range(6)), "Y"]) + "\n"
    + "\n".join(",".join(str(i + j) for j in range(7)) for i in range(10)) + "\n"
).encode()  # fmt: skip
LONG_CSV = b"X1,Y\n" + b"".join(f"{i % 10},{i % 7}\n".encode() for i in range(1001))
BIG_CSV = b"X1,X2,Y\n" + b"1.000001,2.000001,5.000001\n" * 400


def synthetic(**changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = json.loads(json.dumps(SPEC))
    for key, value in changes.items():
        if key in ("n_samples", "n_features"):
            spec["data"]["synthetic"][key] = value
        else:
            spec[key] = value
    return spec


def from_file(name: str) -> dict[str, Any]:
    spec = synthetic()
    spec["data"] = {"path": name, "target": "Y"}
    return spec


def limit(document: dict[str, Any], expected: str, *args: str, id: str) -> Any:
    return pytest.param(document, args, expected, id=id)


LIMIT_CASES = [
    limit(
        synthetic(n_samples=1001),
        "data.synthetic.n_samples: 1001 rows, more than the limit of 1000",
        id="rows",
    ),
    limit(
        synthetic(n_features=6),
        "data.synthetic.n_features: 6 features, more than the limit of 5",
        id="features",
    ),
    limit(synthetic(epochs=101), "epochs: 101, more than the limit of 100", id="epochs"),
    limit(
        synthetic(n_samples=201, epochs=100),
        "epochs: 201 rows x 100 epochs, more than the limit of 20000",
        id="rows-x-epochs",
    ),
    limit(
        synthetic(),
        "--grid: 6 points, more than the limit of 4",
        *("--grid", "epochs=1,2,3", "--grid", "seed=1,2"),
        id="grid-points",
    ),
    limit(
        synthetic(),
        "epochs: 101, more than the limit of 100",
        *("--grid", "epochs=50,100,101"),
        id="grid-epochs",
    ),
    limit(
        synthetic(),
        "epochs: 1000000000000, more than the limit of 100",
        *("--set", "epochs=1000000000000"),
        id="set-epochs",
    ),
    limit(
        from_file("wide.csv"),
        "wide.csv: 6 feature columns, more than the limit of 5 (max_features)",
        id="file-features",
    ),
    limit(
        from_file("long.csv"),
        "long.csv: more than 1000 data rows, the limit (max_rows)",
        id="file-rows",
    ),
    limit(
        from_file("big.csv"),
        f"big.csv: {len(BIG_CSV)} bytes, more than the limit of 8192 (max_dataset_bytes)",
        id="file-bytes",
    ),
    limit(
        {**from_file("mid.csv"), "epochs": 100},
        "epochs: 201 rows x 100 epochs, more than the limit of 20000",
        id="file-rows-x-epochs",
    ),
]


@pytest.mark.parametrize(("document", "args", "expected"), LIMIT_CASES)
def test_resource_limits_refuse_at_submit(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    redis_url: str,
    document: dict[str, Any],
    args: tuple[str, ...],
    expected: str,
) -> None:
    import redis

    env = use_env(monkeypatch, tmp_path, broker_url=redis_url, **LIMITS)
    files = {"wide.csv": WIDE_CSV, "long.csv": LONG_CSV, "big.csv": BIG_CSV, "good.csv": GOOD_CSV}
    files["mid.csv"] = b"X1,Y\n" + b"".join(f"{i},{i}\n".encode() for i in range(201))
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    client = redis.Redis.from_url(redis_url)
    url = env["LRQ_DATABASE_URL"]
    assert run_cli("submit", str(write_spec(tmp_path, synthetic()))).exit_code == 0
    before = state_counts(url, client)
    assert (before["jobs"], before["redis cpu"]) == (1, 1)

    result = run_cli("submit", str(write_spec(tmp_path, document)), *args)
    assert result.exit_code == 2, result.output
    assert f"error: {expected}" in result.stderr
    assert result.stdout == ""
    assert state_counts(url, client) == before

    path = document["data"].get("path")
    if path is not None and path != "mid.csv":
        added = run_cli("datasets", "add", path, "--target", "Y")
        assert added.exit_code == 2, added.output
        assert f"error: {expected}" in added.stderr
        assert state_counts(url, client) == before
