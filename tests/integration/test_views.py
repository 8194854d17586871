"""Seeing experiments: status (newest first, typed JSON, the live watch), sweeps as a whole,
`submit --wait` progress; through Click's runner, as subprocesses and in a pseudo-terminal."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pexpect
import pytest

from tests.support import WorkerProcess, load_jobs, run_cli, submit_ids, wait_jobs

ROOT = Path(__file__).resolve().parents[2]
SWEEP_SPEC = str(ROOT / "examples" / "sweep.yaml")
#: About a hundredth of a second an epoch: long enough to be seen running.
SLOW = ("--set", "data.synthetic.n_samples=20000", "--set", "batch_size=16", "--set", "engine=loop")
LRS = [1e-2, 1e-3, 3e-3]
BATCHES = [256, 32]


@contextmanager
def worker(env: dict[str, str], log: Path) -> Iterator[WorkerProcess]:
    process = WorkerProcess(env, log)
    try:
        yield process.wait_ready()
    finally:
        process.stop()


def ok(*args: str) -> str:
    result = run_cli(*args)
    assert result.exit_code == 0, (args, result.output)
    return result.stdout


def lrq_process(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`lrq ARGS` as its own process, output captured (no terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def sqlite_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_url: str) -> dict[str, str]:
    """One database is enough for the terminal tests: they test what is drawn."""
    from service import db
    from tests.support import set_lrq_env

    url = f"sqlite:///{tmp_path / 'lrq.db'}"
    db.upgrade(url)
    values = set_lrq_env(monkeypatch, tmp_path, database_url=url, broker_url=redis_url)
    return {**os.environ, **values, "PYTHONPATH": str(ROOT)}


def test_sweep_show_list_compare_in_grid_order(lrq_env: dict[str, str], tmp_path: Path) -> None:
    from service.sweeps import sweep_frame

    url = lrq_env["LRQ_DATABASE_URL"]
    grid = ("--grid", "optimizer.lr=" + ",".join(map(str, LRS)))
    grid += ("--grid", "batch_size=" + ",".join(map(str, BATCHES)))
    quiet = run_cli("submit", SWEEP_SPEC, *grid, "-q")
    assert quiet.exit_code == 0, quiet.output
    first, *ids = quiet.stdout.splitlines()
    assert first.startswith("# sweep ") and len(ids) == 6
    sweep_id = first.split()[2]
    assert submit_ids(SWEEP_SPEC, "--set", "epochs=2") != []  # a job outside the sweep
    env = {**lrq_env, "PYTHONPATH": str(ROOT)}
    with worker(env, tmp_path / "worker.log") as process:
        found = {j.id: j for j in wait_jobs(url, ids, timeout=120, workers=[process])}

    expected_order = list(itertools.product(LRS, BATCHES))
    assert [(found[i].spec["optimizer"]["lr"], found[i].spec["batch_size"]) for i in ids] == (
        expected_order
    )
    rows = json.loads(ok("sweep", "show", sweep_id[:8], "--format", "json"))
    assert [r["id"] for r in rows] == ids
    assert [(r["optimizer.lr"], r["batch_size"]) for r in rows] == expected_order
    for row in rows:
        result = found[row["id"]].result
        for key in ("train_loss", "test_loss", "optimum_gap", "train_seconds"):
            assert row[key] == result[key], key
        assert row["epochs_done"] == 30 and row["state"] == "succeeded"
    best = min(rows, key=lambda r: r["test_loss"])
    assert [r["best"] for r in rows] == [r is best for r in rows]
    # The same rows as a DataFrame, and sorted by a metric.
    frame = sweep_frame(sweep_id, url=url)
    assert frame.to_dict("records") == rows
    ranked = json.loads(ok("sweep", "show", sweep_id, "--sort", "optimum_gap", "--format", "json"))
    assert [r["optimum_gap"] for r in ranked] == sorted(r["optimum_gap"] for r in rows)
    as_process = lrq_process(env, "sweep", "show", sweep_id, "--format", "csv")
    assert as_process.returncode == 0, as_process.stderr
    assert [line.split(",")[8] for line in as_process.stdout.splitlines()[1:]] == ids
    table = ok("sweep", "show", sweep_id).splitlines()
    assert table[0].split()[:3] == ["OPTIMIZER.LR", "BATCH_SIZE", "TRAIN_LOSS"]
    marked = [line for line in table[1:] if line.rstrip().endswith("*")]
    assert [line.split()[-2] for line in marked] == [best["id"][:12]]
    refused = run_cli("sweep", "show", sweep_id, "--sort", "colour")
    assert refused.exit_code == 2 and refused.stderr.startswith("error: --sort: 'colour'")

    # status and results --sweep keep grid order too.
    status = json.loads(ok("status", "--sweep", sweep_id, "--format", "json"))
    assert [r["id"] for r in status] == ids
    summary = json.loads(ok("results", "--sweep", sweep_id, "--format", "json"))
    assert [r["id"] for r in summary] == ids

    # lrq sweeps: one row per sweep with its counts and best value (also as a subprocess).
    listed = lrq_process(env, "sweeps", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    [entry] = json.loads(listed.stdout)
    assert (entry["id"], entry["size"], entry["succeeded"], entry["queued"]) == (sweep_id, 6, 6, 0)
    assert (entry["best_metric"], entry["best_value"]) == ("test_loss", best["test_loss"])
    assert entry["best_id"] == best["id"]
    line = ok("sweeps").splitlines()[1].split()
    assert line[:5] == [sweep_id[:12], "sweep", "6", "6", "succeeded"]

    # results --compare: the spec fields that differ, and the results with their change.
    a, b = found[ids[0]], found[ids[1]]
    diff = json.loads(ok("results", "--compare", a.id, b.id, "--format", "json"))
    fields = {r["field"]: r for r in diff}
    assert {k for k in fields if k.startswith("spec.")} == {"spec.batch_size", "spec.name"}
    assert (fields["spec.batch_size"]["a"], fields["spec.batch_size"]["b"]) == (256, 32)
    loss = fields["train_loss"]
    assert (loss["a"], loss["b"]) == (a.result["train_loss"], b.result["train_loss"])
    assert loss["change"] == b.result["train_loss"] - a.result["train_loss"]
    compared = lrq_process(env, "results", "--compare", a.id, b.id)
    assert compared.returncode == 0, compared.stderr
    assert compared.stdout.splitlines()[1].split()[:3] == ["spec.batch_size", "256", "32"]
    one = run_cli("results", "--compare", a.id)
    assert one.exit_code == 2 and "--compare: give exactly two job ids" in one.stderr
    # A single job's results end with a sparkline of its loss history.
    spark = ok("results", a.id).splitlines()[-1]
    assert spark.startswith("loss ") and "(30 epochs, log scale)" in spark
    assert any(c in spark for c in "▁▂▃▄▅▆▇█")


def test_status_newest_first_limited_and_typed(sqlite_env: dict[str, str]) -> None:
    seeds = ",".join(str(s) for s in range(23))
    ids = submit_ids(SWEEP_SPEC, "--grid", f"seed={seeds}")
    [last] = submit_ids(SWEEP_SPEC, "--set", "name=latest")
    table = ok("status").splitlines()
    assert table[1].split()[:2] == [last[:12], "latest"]  # newest first
    assert len(table) == 1 + 20 + 1
    assert table[-1] == "... 4 older job(s) not shown (--limit N or --all)"
    assert len(ok("status", "--all").splitlines()) == 1 + 24
    limited = run_cli("status", "--limit", "3", "--format", "json")
    newest = [r["id"] for r in json.loads(limited.stdout)]
    assert len(newest) == 3 and newest[0] == last
    assert limited.stderr.strip() == "... 21 older job(s) not shown (--limit N or --all)"
    rows = json.loads(ok("status", "--all", "--format", "json"))
    by_id = {job.id: job for job in load_jobs(sqlite_env["LRQ_DATABASE_URL"])}
    for row in rows:
        job = by_id[row["id"]]
        assert row["epochs_done"] == 0 and row["epochs_total"] == 30 and row["attempts"] == 0
        assert row["sweep_id"] == job.sweep_id and row["error"] is None
        assert row["created_at"] == job.created_at.isoformat()
        assert row["started_at"] is None and row["last_loss"] is None
    assert {r["sweep_id"] for r in rows if r["id"] in ids} == {by_id[ids[0]].sweep_id}
    as_process = lrq_process(sqlite_env, "status", "--format", "csv", "--limit", "2")
    assert as_process.returncode == 0, as_process.stderr
    assert as_process.stdout.splitlines()[0].split(",")[:8] == [
        "id",
        "name",
        "sweep_id",
        "backend",
        "device",
        "queue",
        "state",
        "epochs_done",
    ]
    assert as_process.stdout.splitlines()[1].split(",")[7:9] == ["0", "30"]


def spawn(env: dict[str, str], *args: str) -> Any:
    """`lrq ARGS` in a pseudo-terminal of 40 lines by 150 columns."""
    return pexpect.spawn(
        sys.executable,
        ["-m", "service.cli", *args],
        env=env,
        dimensions=(40, 150),
        encoding="utf-8",
        timeout=120,
    )


def test_watch_redraws_in_a_terminal_and_stops(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    ids = submit_ids(SWEEP_SPEC, *SLOW, "--set", "epochs=250", "--grid", "seed=1,2")
    child = spawn(sqlite_env, "status", "--watch")
    child.expect("2 queued")
    with worker(sqlite_env, tmp_path / "worker.log") as process:
        child.expect("running")
        child.expect("2 succeeded")
        child.expect(pexpect.EOF)
        child.close()
        found = wait_jobs(sqlite_env["LRQ_DATABASE_URL"], ids, timeout=10, workers=[process])
    assert child.exitstatus == 0
    shown = child.before or ""
    assert [job.state for job in found] == ["succeeded"] * 2
    assert "━" in shown  # a progress bar
    assert "\x1b[" in shown  # redrawn in place with cursor movements
    assert "250/250" in shown


def test_watch_without_a_terminal_prints_plain_lines(
    sqlite_env: dict[str, str], tmp_path: Path
) -> None:
    ids = submit_ids(SWEEP_SPEC, *SLOW, "--set", "epochs=150", "--grid", "seed=1,2")
    watching = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "status", "--watch"],
        env=sqlite_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with worker(sqlite_env, tmp_path / "worker.log") as process:
        out, err = watching.communicate(timeout=120)
    assert watching.returncode == 0, err
    for job_id in ids:  # the worker's text log names the job on each of its lines
        assert f"] job {job_id}: Task lrq.run_job[{job_id}] succeeded in " in process.text()
    assert "\x1b" not in out
    lines = out.splitlines()
    assert lines[-1] == "-- 2 succeeded"
    for job_id in ids:
        mine = [line.split()[1:4] for line in lines if not line.startswith("--")]
        assert [job_id[:12], "succeeded", "150/150"] in mine
        assert [job_id[:12], "queued", "0/150"] in mine


def test_submit_wait_shows_progress(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    seeds = ",".join(str(s) for s in range(10))
    with worker(sqlite_env, tmp_path / "worker.log"):
        # Ten jobs: one bar for the sweep, with its counts per state.
        child = spawn(
            sqlite_env, "submit", SWEEP_SPEC, "--set", "epochs=20", "--grid", f"seed={seeds}",
            "--wait", "--timeout", "120",
        )  # fmt: skip
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, child.before
        shown = child.before or ""
        assert "━" in shown and "\x1b[" in shown
        assert "10/10" in shown and "10 succeeded" in shown
        # Without a terminal: progress as plain lines on stderr, the outcome on stdout.
        waited = run_cli("submit", SWEEP_SPEC, "--set", "epochs=5", "--wait", "--timeout", "120")
    assert waited.exit_code == 0, waited.output
    job_id = waited.stdout.split()[0]
    assert waited.stdout.splitlines()[-1] == f"{job_id[:12]}  succeeded"
    assert "\x1b" not in waited.stderr
    assert waited.stderr.splitlines()[-1] == "-- 1 succeeded"
    assert any(
        line.split()[1:4] == [job_id[:12], "succeeded", "5/5"]
        for line in waited.stderr.splitlines()
    )


def test_plots_per_row_losses_colour_bars_and_formats(
    sqlite_env: dict[str, str], tmp_path: Path
) -> None:
    import xml.etree.ElementTree as ET

    from matplotlib.colors import to_hex
    from PIL import Image

    from service import db, jobs, plots
    from service.sweeps import sweep_jobs
    from tests.support import epoch_losses

    url = sqlite_env["LRQ_DATABASE_URL"]
    # Full batch: a `mean` run with lr·n follows the `sum` run with lr exactly, per row.
    rows = 1500  # the sweep spec's 2000 rows less its 25% test fraction
    full = ("--set", "batch_size=null", "--set", "epochs=40")
    [summed] = submit_ids(
        SWEEP_SPEC, *full, "--set", "loss.reduction=sum", "--set", "optimizer.lr=2e-5"
    )
    [averaged] = submit_ids(
        SWEEP_SPEC, *full, "--set", "loss.reduction=mean", "--set", f"optimizer.lr={2e-5 * rows}"
    )
    lrs = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    quiet = run_cli(
        "submit", SWEEP_SPEC, "--grid", "optimizer.lr=" + ",".join(map(str, lrs)),
        "--grid", "batch_size=64,512", "-q",
    )  # fmt: skip
    sweep_id = quiet.stdout.split()[2]
    ids = [line for line in quiet.stdout.splitlines() if not line.startswith("#")]
    with worker(sqlite_env, tmp_path / "worker.log") as process:
        wait_jobs(url, [summed, averaged, *ids], timeout=120, workers=[process])

    one = tmp_path / "two.png"
    made = lrq_process(sqlite_env, "plot", summed, averaged, "-o", str(one), "--test")
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == f"wrote {one} (2 curves)"
    with Image.open(one) as image:
        assert image.format == "PNG"
        assert image.size == (int(plots.PANEL[0] * plots.DPI), int(plots.PANEL[1] * plots.DPI))
    # The figure's own data: curves per row, equal for the two reductions, against the history.
    with db.transaction(url) as session:
        found = jobs.find_jobs(session=session, ids=[summed, averaged])
        frame = jobs.history_frame([summed, averaged], session=session)
    lines = plots.curves(found, frame, y="loss", dataset_rows={})
    fig = plots.figure(lines, test=True)
    drawn = {line.get_gid(): list(line.get_ydata()) for line in fig.axes[0].get_lines()}
    assert set(drawn) == {summed, averaged, f"{summed}:test", f"{averaged}:test"}
    assert drawn[summed] == [loss / rows for _, loss in epoch_losses(url, summed)]
    assert drawn[averaged] == [loss for _, loss in epoch_losses(url, averaged)]
    assert all(
        abs(a - b) <= 1e-9 * abs(b) for a, b in zip(drawn[summed], drawn[averaged], strict=True)
    )
    assert fig.axes[0].get_ylabel() == "loss: mean squared error per row"
    assert all(line.get_linestyle() == "--" for line in fig.axes[0].get_lines()[1::2])

    # A sweep of two parameters: one panel per batch size, coloured by lr with a colour bar.
    vector = tmp_path / "sweep.svg"
    made = run_cli("plot", "--sweep", sweep_id[:8], "-o", str(vector), "--y", "gap")
    assert made.exit_code == 0, made.output
    groups = {g.get("id") for g in ET.parse(vector).iter("{http://www.w3.org/2000/svg}g")}
    assert set(ids) <= groups and len(ids) == 10
    with db.transaction(url) as session:
        _, members = sweep_jobs(sweep_id, session=session)
        frame = jobs.history_frame(ids, session=session)
    varied = ["optimizer.lr", "batch_size"]
    fig = plots.figure(plots.curves(members, frame, y="gap", dataset_rows={}, varied=varied),
                       varied=varied, y="gap")  # fmt: skip
    panels = [axis for axis in fig.axes if axis.get_title()]
    assert [axis.get_title() for axis in panels] == ["batch_size = 64", "batch_size = 512"]
    assert [len(axis.get_lines()) for axis in panels] == [5, 5]
    assert [axis.get_ylabel() for axis in fig.axes if not axis.get_title()] == ["optimizer.lr"]
    colours = [to_hex(line.get_color()) for line in panels[0].get_lines()]
    assert len(set(colours)) == 5  # one colour per lr, on a continuous map
    assert panels[0].get_ylabel() == "optimum gap: MSE per row minus the least-squares MSE"
    for job in members:
        [line] = [ln for axis in panels for ln in axis.get_lines() if ln.get_gid() == job.id]
        optimum = job.result["optimum_loss"]  # a `mean` run: already per row
        expected = [loss - optimum for _, loss in epoch_losses(url, job.id)]
        # On a log axis a gap at or below zero cannot be drawn: it is left out (NaN).
        for drawn_value, value in zip(line.get_ydata(), expected, strict=True):
            assert drawn_value == value or (value <= 0 and np.isnan(drawn_value))

    # An unknown extension is refused before anything is read or written.
    refused = run_cli("plot", summed, "-o", str(tmp_path / "plot.jpg"))
    assert refused.exit_code == 2
    assert refused.stderr.startswith(
        f"error: -o {tmp_path / 'plot.jpg'}: unsupported format '.jpg'"
    )
    assert not (tmp_path / "plot.jpg").exists()
    # In the terminal: the curves as text.
    text = run_cli("plot", "--sweep", sweep_id, "--terminal")
    assert text.exit_code == 0, text.output
    assert "epoch" in text.stdout and "\x1b" not in text.stdout
    assert sum(c in "⠁⠂⠄⡀⢀⠠⠐⠈⣀⠤⠒⠉" for c in text.stdout) > 20
