"""The `lrq` commands a person types, against real workers, Redis and each database."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.support import (
    DEADLINE_SCALE,
    RedisServer,
    WorkerProcess,
    epoch_losses,
    free_port,
    load_jobs,
    run_cli,
    submit_ids,
    wait_jobs,
)

ROOT = Path(__file__).resolve().parents[2]
SWEEP_SPEC = str(ROOT / "examples" / "sweep.yaml")
STATUS_COLUMNS = ["id", "name", "backend", "device", "state", "epoch", "last_loss", "worker", "age"]
STATUS_FIELDS = ["id", "name", "sweep_id", "backend", "device", "queue", "state", "epochs_done"]
STATUS_FIELDS += ["epochs_total", "last_loss", "attempts", "worker", "error", "created_at"]
STATUS_FIELDS += ["started_at", "finished_at"]
HISTORY_COLUMNS = ["job_id", "epoch", "train_loss", "test_loss", "seconds"]


@contextmanager
def worker(env: dict[str, str], log: Path, **options: Any) -> Iterator[WorkerProcess]:
    process = WorkerProcess(env, log, **options)
    try:
        yield process.wait_ready()
    finally:
        process.stop()


def ok(*args: str) -> str:
    """stdout of a command that must succeed."""
    result = run_cli(*args)
    assert result.exit_code == 0, (args, result.output)
    return result.stdout


def refused(*args: str, code: int = 2) -> str:
    """stderr of a command that must fail with ``code``."""
    result = run_cli(*args)
    assert result.exit_code == code, (args, result.output)
    assert result.stderr.startswith("error: "), result.stderr
    return result.stderr


def parse_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def shortest_unique_prefix(job_id: str, others: list[str]) -> str:
    for length in range(1, len(job_id) + 1):
        prefix = job_id[:length]
        if sum(other.startswith(prefix) for other in others) == 1:
            return prefix
    raise AssertionError(job_id)


def test_prefixes_and_every_output_format(lrq_env: dict[str, str], tmp_path: Path) -> None:
    url = lrq_env["LRQ_DATABASE_URL"]
    seeds = ",".join(str(seed) for seed in range(17))
    with worker(lrq_env, tmp_path / "worker.log") as process:
        grid = ("--grid", f"seed={seeds}")
        submitted = run_cli(
            "submit",
            SWEEP_SPEC,
            "--set=epochs=3",
            *grid,
            "--wait",
            f"--timeout={120 * DEADLINE_SCALE:g}",
        )
        assert submitted.exit_code == 0, submitted.output + process.text()[-3000:]
    lines = submitted.stdout.splitlines()
    assert lines[0].startswith("sweep ")
    sweep_id = lines[0].split()[1]
    ids = [line.split()[0] for line in lines[1:18]]
    assert [line.split()[1:] for line in lines[1:18]] == [
        [f"sweep[seed={seed}]", "queue=cpu"] for seed in range(17)
    ]
    assert sorted(lines[18:]) == sorted(f"{job_id[:12]}  succeeded" for job_id in ids)
    found = {job.id: job for job in load_jobs(url, ids)}

    # Short ids resolve as git resolves hashes; 17 ids share a first digit somewhere.
    first = ids[0]
    prefix = shortest_unique_prefix(first, ids)
    assert ok("status", prefix).splitlines()[1].split()[0] == first[:12]
    assert [row["id"] for row in json.loads(ok("results", prefix, "--format", "json"))] == [first]
    shared = next(i[0] for i in ids if sum(j.startswith(i[0]) for j in ids) > 1)
    assert "ambiguous, give more characters" in refused("status", shared)
    unknown = next(p for p in ("0" * 12, "f" * 12) if not any(i.startswith(p) for i in ids))
    assert f"job id {unknown!r}: no such job" in refused("results", unknown)
    assert "not a hex id or prefix" in refused("cancel", "not-an-id")
    assert "give job ids (or prefixes), or --sweep" in refused("results")

    # status: table, JSON, CSV, and the filters.
    table = ok("status", "--sweep", sweep_id[:6]).splitlines()
    assert table[0].split() == [c.upper() for c in STATUS_COLUMNS]
    assert sorted(row.split()[0] for row in table[1:]) == sorted(i[:12] for i in ids)
    assert {tuple(row.split()[2:6]) for row in table[1:]} == {("numpy", "cpu", "succeeded", "3/3")}
    assert sorted(row.split()[1] for row in table[1:]) == sorted(found[i].name for i in ids)
    as_json = json.loads(ok("status", "--sweep", sweep_id, "--format", "json"))
    assert [list(row) for row in as_json] == [STATUS_FIELDS] * 17
    assert [row["id"] for row in as_json] == ids  # grid order
    assert {row["id"]: row["last_loss"] for row in as_json} == {i: found[i].last_loss for i in ids}
    as_csv = parse_csv(ok("status", "--format", "csv", "--state", "succeeded", "--all"))
    assert sorted((row["id"], row["state"], row["epochs_done"]) for row in as_csv) == sorted(
        (row["id"], "succeeded", "3") for row in as_json
    )
    by_id = {row["id"]: row for row in as_json}
    assert all(float(row["last_loss"]) == by_id[row["id"]]["last_loss"] for row in as_csv)
    newest = json.loads(ok("status", "--limit", "5", "--format", "json"))
    assert len(newest) == 5 and {row["id"] for row in newest} <= set(ids)
    assert ok("status", "--state", "running", "--format", "json").strip() == "[]"

    # results: the summary as a table, JSON, CSV and into a file.
    summary = json.loads(ok("results", "--sweep", sweep_id, "--format", "json"))
    assert sorted(row["id"] for row in summary) == sorted(ids)
    for row in summary:
        job = found[row["id"]]
        assert row["state"] == "succeeded" and row["epochs_done"] == 3
        for key in ("train_loss", "test_loss", "optimum_loss", "weights", "bias"):
            assert row[key] == job.result[key], key
    by_csv = parse_csv(ok("results", *ids, "--format", "csv"))
    assert [row["id"] for row in by_csv] == [row["id"] for row in summary]
    for text_row, row in zip(by_csv, summary, strict=True):
        assert json.loads(text_row["weights"]) == row["weights"]
        assert float(text_row["train_loss"]) == row["train_loss"]
        assert float(text_row["bias"]) == row["bias"]
    table = ok("results", "--sweep", sweep_id).splitlines()
    assert table[0].split()[:4] == ["ID", "NAME", "STATE", "EPOCHS_DONE"]
    assert sorted(line.split()[0] for line in table[1:]) == sorted(i[:12] for i in ids)
    wide = json.loads(ok("results", first, "--all-columns", "--format", "json"))[0]
    assert wide["spec.seed"] == found[first].spec["seed"]
    assert wide["spec.optimizer.lr"] == 1e-3
    written = tmp_path / "results.json"
    out = run_cli("results", "--sweep", sweep_id, "--format", "json", "-o", str(written))
    assert out.exit_code == 0 and out.stdout == ""
    assert out.stderr.strip() == f"wrote 17 rows to {written}"
    assert json.loads(written.read_text()) == summary

    # results --history: one row per epoch, exact in JSON and in CSV.
    history = json.loads(ok("results", "--sweep", sweep_id, "--history", "--format", "json"))
    assert len(history) == 17 * 3 and list(history[0]) == HISTORY_COLUMNS
    for job_id in ids:
        mine = [(r["epoch"], r["train_loss"]) for r in history if r["job_id"] == job_id]
        assert mine == epoch_losses(url, job_id)
    assert all(r["test_loss"] is not None and r["seconds"] >= 0 for r in history)
    history_file = tmp_path / "history.csv"
    out = run_cli("results", *ids, "--history", "--format", "csv", "-o", str(history_file))
    assert out.exit_code == 0, out.output
    assert out.stderr.strip() == f"wrote 51 rows to {history_file}"
    from_file = parse_csv(history_file.read_text())
    assert list(from_file[0]) == HISTORY_COLUMNS
    assert [(r["job_id"], int(r["epoch"]), float(r["train_loss"])) for r in from_file] == [
        (r["job_id"], r["epoch"], r["train_loss"]) for r in history
    ]
    one = ok("results", prefix, "--history").splitlines()
    assert one[0].split() == [c.upper() for c in HISTORY_COLUMNS]
    assert [line.split()[:2] for line in one[1:]] == [[first, str(e)] for e in (1, 2, 3)]


def write_points(path: Path, *, rows: int, seed: int) -> None:
    """A CSV of y = 2·X1 - X2 + 0.5·X3 + 1 with a little noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3))
    y = x @ np.array([2.0, -1.0, 0.5]) + 1.0 + rng.normal(scale=0.01, size=rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["X1", "X2", "X3", "Y"])
        writer.writerows(np.column_stack([x, y]).tolist())


def file_spec(name: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "data": data,
        "backend": "numpy",
        "model": {"init": "zeros"},
        "loss": {"reduction": "mean"},
        "optimizer": {"lr": 0.05},
        "epochs": 40,
        "batch_size": 32,
        "dtype": "float64",
    }


def test_registered_datasets_and_data_files(lrq_env: dict[str, str], tmp_path: Path) -> None:
    url = lrq_env["LRQ_DATABASE_URL"]
    data_dir = Path(lrq_env["LRQ_DATA_DIR"])
    write_points(data_dir / "files" / "points.csv", rows=300, seed=1)
    write_points(data_dir / "files" / "more.csv", rows=200, seed=2)

    added = ok("datasets", "add", "files/points.csv", "--target", "Y", "--name", "points")
    dataset_id, name, *rest = added.split()
    assert (len(dataset_id), name, rest) == (64, "points", ["300", "rows", "3", "features"])
    assert ok("datasets", "add", "files/points.csv", "--target", "Y").split()[0] == dataset_id
    assert "outside the data directory" in refused(
        "datasets", "add", str(ROOT / "examples" / "sweep.yaml"), "--target", "Y"
    )

    by_name = tmp_path / "by-name.yaml"
    by_name.write_text(yaml.safe_dump(file_spec("by-name", {"dataset": "points", "target": "Y"})))
    by_path = tmp_path / "by-path.yaml"
    by_path.write_text(
        yaml.safe_dump(
            file_spec(
                "by-path",
                {
                    "path": "files/more.csv",
                    "target": "Y",
                    "features": ["X1", "X3"],
                    "test": {"fraction": 0.25},
                },
            )
        )
    )
    expected = json.loads(ok("run", str(by_path), "--json"))
    [from_dataset] = submit_ids(str(by_name))
    [from_file] = submit_ids(str(by_path))
    # Submit registered the file; the worker reads the database, never the file.
    (data_dir / "files" / "more.csv").unlink()
    (data_dir / "files" / "points.csv").unlink()
    listed = json.loads(ok("datasets", "list", "--format", "json"))
    assert [(d["name"], d["rows"], d["target"], d["features"]) for d in listed] == [
        ("points", 300, "Y", ["X1", "X2", "X3"]),
        ("more.csv", 200, "Y", ["X1", "X3"]),
    ]
    assert "dataset: no dataset with id or name 'nothing'" in refused(
        "submit", str(by_name), "--set", "data.dataset=nothing"
    )

    with worker(lrq_env, tmp_path / "worker.log") as process:
        found = wait_jobs(url, [from_dataset, from_file], timeout=60, workers=[process])
        info = ok("info").splitlines()
    assert [(job.state, job.epochs_done) for job in found] == [("succeeded", 40)] * 2
    jobs = {job.name: job for job in found}
    assert jobs["by-name"].dataset_id == dataset_id == jobs["by-name"].spec["data"]["dataset"]
    assert jobs["by-path"].dataset_id == listed[1]["id"]
    assert jobs["by-path"].spec["data"]["path"] is None
    assert [loss for _, loss in epoch_losses(url, from_file)] == expected["history"]
    assert jobs["by-path"].result["weights"] == expected["weights"]
    assert len(jobs["by-name"].result["weights"]) == 3

    workers = [line.split() for line in info if line.startswith("  ")]  # one line per worker
    assert [w[0].startswith("lrq-cpu@") and w[-2:] == ["running", "idle"] for w in workers] == [
        True
    ]
    info = [line for line in info if not line.startswith("  ")]
    keys = [line.split()[0] for line in info]
    assert keys == ["database", "broker", "jobs", "queues", "workers"]
    values = {line.split()[0]: line.split(None, 1)[1] for line in info}
    assert values["broker"] == lrq_env["LRQ_BROKER_URL"]
    assert values["jobs"] == "succeeded 2"
    assert values["queues"] == "cpu 0, gpu 0"
    assert values["workers"].startswith("lrq-cpu@")


def test_info_never_shows_a_password(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pg_url: str, redis_url: str
) -> None:
    from sqlalchemy.engine import make_url

    from service import db

    db.upgrade(pg_url)
    # Trust authentication ignores the password; Redis refuses one it was not given.
    with_password = make_url(pg_url).set(password="hunter2-db").render_as_string(False)
    monkeypatch.setenv("LRQ_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LRQ_DATABASE_URL", with_password)
    monkeypatch.setenv("LRQ_BROKER_URL", redis_url.replace("redis://", "redis://:hunter2-mq@"))
    monkeypatch.setenv("LRQ_BROKER_TIMEOUT", "2")
    result = run_cli("info")
    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.output
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert ":***@" in lines["database"] and ":***@" in lines["broker"]
    assert lines["jobs"] == "none"


def test_reconcile_publishes_what_the_broker_lost(
    lrq_env: dict[str, str], tmp_path: Path, redis_server: RedisServer
) -> None:
    from sqlalchemy import update

    from service import db
    from service.models import Job
    from service.queue import held_job_ids, make_app
    from service.settings import Settings

    url = lrq_env["LRQ_DATABASE_URL"]
    broker = lrq_env["LRQ_BROKER_URL"]
    # A submit while the broker is down records the job and says who will queue it.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LRQ_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
        down = run_cli("submit", SWEEP_SPEC, "--set", "epochs=3", "-q")
    assert down.exit_code == 1
    assert "unreachable" in down.stderr and "lrq reconcile" in down.stderr
    [unsent] = down.stdout.split()
    # Two jobs whose workers died: one may run again, one used its last attempt.
    lapsed, spent = submit_ids(SWEEP_SPEC, "--set", "epochs=3", "--grid", "seed=1,2")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    with db.transaction(url) as session:
        for job_id, attempts in ((lapsed, 1), (spent, 3)):
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(state="running", attempts=attempts, worker="gone:1", lease_expires_at=past)
            )
    redis_server.client().delete("cpu")

    assert ok("reconcile").strip() == "requeued 1, failed 1, published 2"
    assert held_job_ids(make_app(Settings(broker_url=broker))) == {unsent, lapsed}
    states = {job.id: (job.state, job.error) for job in load_jobs(url)}
    assert states == {
        unsent: ("queued", None),
        lapsed: ("queued", None),
        spent: ("failed", "worker lost: 3 attempts, the limit"),
    }
    assert ok("reconcile").strip() == "requeued 0, failed 0, published 0"

    with worker(lrq_env, tmp_path / "worker.log") as process:
        found = wait_jobs(url, [unsent, lapsed], timeout=60, workers=[process])
    assert [(job.state, job.epochs_done) for job in found] == [("succeeded", 3)] * 2
