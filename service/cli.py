"""The `lrq` command line: thin over jobs, submission and dispatch. Never imports torch."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

from service import db, jobs
from service.errors import InputError, LrqError, StateError
from service.settings import Settings, get_settings

FORMATS = click.Choice(["table", "json", "csv"])


#: The exit code shells give a command that SIGINT (Ctrl-C) ended.
INTERRUPTED = 130


class LrqGroup(click.Group):
    """Turns every LrqError into one readable line and its exit code, in one place."""

    def invoke(self, ctx: click.Context) -> Any:
        from sqlalchemy.exc import DBAPIError

        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            # Not click's "Aborted!" with exit 1: a script must tell Ctrl-C from a failure.
            click.echo("interrupted", err=True)
            ctx.exit(INTERRUPTED)
        except LrqError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except DBAPIError as exc:
            # The driver's own message only: SQLAlchemy's text would add statement parameters.
            url = db.mask_url(get_settings().resolved_database_url())
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
            click.echo(f"error: database {url}: {reason}", err=True)
            ctx.exit(1)


def _output_path(output: str, suffixes: Sequence[str] | None = None) -> Path:
    """An -o file lrq can write: its directory exists and, if asked, its suffix is known."""
    path = Path(output)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise InputError(
            f"-o {output}: unsupported format {path.suffix or '(none)'!r}; "
            f"use {', '.join(suffixes)}"
        )
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"-o {output}: no directory {str(folder.absolute())!r}")
    if path.is_dir():
        raise InputError(f"-o {output}: is a directory")
    return path


def _write_output(path: Path, write: Callable[[Path], object]) -> None:
    try:
        write(path)
    except OSError as exc:
        raise InputError(f"-o {path}: cannot write ({exc.strerror})") from None


def _fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.group(cls=LrqGroup)
@click.version_option(package_name="lrq")
def main() -> None:
    """lrq: queue regression-training runs, run them on CPU and GPU workers, query results."""


def _settings() -> Settings:
    return get_settings()


def _url(check: bool = True) -> str:
    url = _settings().resolved_database_url()
    if check:
        db.check_schema(url)
    return url


def _app() -> Any:
    from service.queue import get_app

    return get_app()


# -- output ---------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    if isinstance(value, dt.datetime):
        return value.isoformat(timespec="seconds")
    return str(value)


def _csv_cell(value: Any) -> str:
    """A CSV field: floats in full (repr reads back exactly), lists as JSON."""
    if isinstance(value, float):
        return repr(float(value))  # a numpy float's repr names its type
    if isinstance(value, list):
        return json.dumps(value)
    return _cell(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return str(value)


def render(rows: Sequence[dict[str, Any]], columns: Sequence[str], fmt: str) -> str:
    """Rows as an aligned table, a JSON array, or CSV with a header."""
    if fmt == "json":
        return json.dumps(
            [{c: row.get(c) for c in columns} for row in rows], default=_json_default, indent=2
        )
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_cell(row.get(c)) for c in columns])
        return buffer.getvalue().rstrip("\n")
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


# -- run ------------------------------------------------------------------------------------


def _load_spec(path: str, overrides: Sequence[str]) -> dict[str, Any]:
    from service import spec

    return spec.apply_overrides(spec.load_document(path), overrides)


@main.command()
@click.argument("spec_file", metavar="SPEC")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a field.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def run(spec_file: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Train one spec in this process and print its result (no queue, no database)."""
    from service import spec
    from workers import engines
    from workers.data import build_train_data, load_spec_table

    settings = _settings()
    job = spec.validate(_load_spec(spec_file, overrides))
    if job.data.dataset is not None:
        raise InputError("data.dataset: `lrq run` trains files or synthetic data; use submit")
    spec.check_limits(job, settings)
    table = load_spec_table(job, settings, spec_dir=spec.spec_directory(spec_file))
    if table is not None:
        spec.check_limits(job, settings, rows=len(table.y), features=len(table.columns))
    data = build_train_data(job, table=table)

    def show(record: Any, _snapshot: Callable[[], Any]) -> None:
        if not as_json:
            test = f"  test {record.test_loss:.6g}" if record.test_loss is not None else ""
            click.echo(f"epoch {record.epoch:>6}  loss {record.train_loss:.6g}{test}")

    result = engines.train(job, data, on_epoch=show)
    summary = dict(result.summary)
    summary["history"] = result.losses
    summary["test_history"] = [r.test_loss for r in result.history]
    if as_json:
        click.echo(json.dumps(jobs.json_safe(summary)))
    else:
        _print_summary(job.name, summary)
    sys.exit(0 if result.status == "succeeded" else 1)


def _print_summary(name: str, summary: dict[str, Any]) -> None:
    keys = ("status", *jobs.SUMMARY_FIELDS)
    click.echo(f"{name}:")
    for key in keys:
        if key in summary:
            click.echo(f"  {key:<14} {_cell(summary[key])}")


# -- submit ---------------------------------------------------------------------------------


def _wait(job_ids: Sequence[str], url: str, timeout: float | None, quiet: bool) -> int:
    from service import views

    deadline = None if timeout is None else time.monotonic() + timeout

    def fetch() -> tuple[list[Any], int]:
        with db.transaction(url) as session:
            return jobs.find_jobs(session=session, ids=job_ids), 0

    if quiet:
        while not views.all_finished(found := fetch()[0]):
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.5)
    else:
        # Progress goes to stderr: stdout keeps the ids and final states for scripts.
        found = views.watch(
            fetch,
            stream=sys.stderr,
            interval=0.5,
            grouped=len(job_ids) > views.GROUP_ABOVE,
            deadline=deadline,
        )
    states = [j.state for j in found]
    if not views.all_finished(found):
        click.echo(f"error: --timeout: jobs still unfinished after {timeout:g}s", err=True)
        return 1
    if not quiet:
        for job in found:
            detail = f" ({job.error})" if job.error else ""
            click.echo(f"{job.id[:12]}  {job.state}{detail}")
    return 0 if all(s == "succeeded" for s in states) else 1


@main.command()
@click.argument("spec_file", metavar="SPEC")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a field.")
@click.option("--grid", multiple=True, metavar="KEY=V1,V2", help="Sweep a field (repeatable).")
@click.option("--queue", default=None, help="Queue to use instead of the device's (cpu, gpu).")
@click.option("--wait", is_flag=True, help="Wait; exit 0 only if every job succeeded.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after N seconds.")
@click.option("-q", "--quiet", is_flag=True, help="Print job ids only.")
@click.option(
    "--pack/--no-pack",
    default=True,
    show_default=True,
    help="Let a worker train a sweep's jobs on the same data as one computation (exact).",
)
def submit(
    spec_file: str,
    overrides: tuple[str, ...],
    grid: tuple[str, ...],
    queue: str | None,
    wait: bool,
    timeout: float | None,
    quiet: bool,
    pack: bool,
) -> None:
    """Validate a spec (or a sweep of it), record the jobs and queue them."""
    from service import dispatch, spec
    from service.errors import BrokerError
    from service.packing import Queued
    from service.routing import gpu_worker_live
    from service.submission import submit as submit_jobs

    settings = _settings()
    document = spec.load_document(spec_file)
    url = _url()
    with db.transaction(url) as session:
        submission = submit_jobs(
            document,
            overrides=overrides,
            grid=grid,
            queue=queue,
            settings=settings,
            session=session,
            gpu_live=lambda: gpu_worker_live(_app()),
            spec_dir=spec.spec_directory(spec_file),
            pack=pack,
        )
        submitted = [Queued(j.id, j.queue, j.spec, j.dataset_id) for j in submission.jobs]
    ids = [job.id for job in submitted]
    if submission.sweep_id:
        # Marked with "#" under -q, so `grep -v '^#'` leaves only job ids.
        click.echo(f"# sweep {submission.sweep_id}" if quiet else f"sweep {submission.sweep_id}")
    for job in submission.jobs:
        click.echo(job.id if quiet else f"{job.id}  {job.name}  queue={job.queue}")
    try:
        dispatch.publish_submitted(_app(), settings, submitted, pack=pack)
    except BrokerError as exc:
        raise BrokerError(
            f"{exc}; {len(ids)} job(s) are recorded and will be queued once the broker is "
            "back (a worker's reconciler or `lrq reconcile` sends them)"
        ) from None
    if wait:
        sys.exit(_wait(ids, url, timeout, quiet))


# -- status and results ---------------------------------------------------------------------


def _select(
    refs: Sequence[str],
    state: str | None,
    sweep: str | None,
    name: str | None,
    url: str,
    limit: int | None = None,
) -> list[Any]:
    """Jobs by filters, oldest first; the jobs of a sweep in its grid order."""
    from service.sweeps import in_grid_order

    with db.transaction(url) as session:
        ids = jobs.resolve_ids(refs, session=session) if refs else None
        sweep_id = jobs.resolve_sweep(sweep, session=session) if sweep else None
        found = jobs.find_jobs(
            session=session, ids=ids, state=state, sweep_id=sweep_id, name=name, limit=limit
        )
        return in_grid_order(found, session=session)


STATE_CHOICE = click.Choice(["queued", "running", "succeeded", "failed", "diverged", "cancelled"])


@main.command()
@click.argument("refs", nargs=-1, metavar="[IDS]...")
@click.option("--state", type=STATE_CHOICE, default=None)
@click.option("--sweep", default=None, help="Jobs of one sweep (id or prefix), in grid order.")
@click.option("--name", default=None, help="Jobs with this name.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="Newest N jobs [default: 20; every job of the ids or sweep given].",
)
@click.option("--all", "show_all", is_flag=True, help="Every job, however many.")
@click.option("--watch", is_flag=True, help="Redraw in place until every job shown has finished.")
@click.option("--format", "fmt", type=FORMATS, default="table")
def status(
    refs: tuple[str, ...],
    state: str | None,
    sweep: str | None,
    name: str | None,
    limit: int | None,
    show_all: bool,
    watch: bool,
    fmt: str,
) -> None:
    """Show jobs, newest first: state, progress, last loss, worker."""
    from service import views

    url = _url()
    if limit is None and not (show_all or refs or sweep):
        limit = views.DEFAULT_LIMIT

    def fetch() -> tuple[list[Any], int]:
        with db.transaction(url) as session:
            return views.select_page(
                session, refs=refs, state=state, sweep=sweep, name=name, limit=limit
            )

    if watch and fmt == "table":
        views.watch(fetch, stream=sys.stdout, interval=2.0)
        return
    while True:
        found, left_out = fetch()
        if fmt == "table":
            text = render([views.table_row(j) for j in found], views.TABLE_COLUMNS, fmt)
            click.echo(text + (f"\n{views.left_out_line(left_out)}" if left_out else ""))
        else:
            records = [views.status_record(j) for j in found]
            click.echo(render(records, views.STATUS_FIELDS, fmt))
            if left_out:
                click.echo(views.left_out_line(left_out), err=True)
        if not watch or views.all_finished(found):
            return
        time.sleep(2)


RESULT_COLUMNS = (
    "id",
    "name",
    "state",
    "epochs_done",
    "train_loss",
    "test_loss",
    "optimum_loss",
    "optimum_gap",
    "weights",
    "bias",
    "train_seconds",
)


@main.command()
@click.argument("refs", nargs=-1, metavar="IDS...")
@click.option("--sweep", default=None, help="Every job of a sweep.")
@click.option("--history", is_flag=True, help="Per-epoch losses instead of the summary.")
@click.option("--all-columns", is_flag=True, help="Every summary field and spec parameter.")
@click.option("--compare", is_flag=True, help="Two jobs: where their specs and results differ.")
@click.option("--format", "fmt", type=FORMATS, default="table")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None)
def results(
    refs: tuple[str, ...],
    sweep: str | None,
    history: bool,
    all_columns: bool,
    compare: bool,
    fmt: str,
    output: str | None,
) -> None:
    """Results of jobs: weights, bias, losses, optimum gap, timings; or their histories."""
    if not refs and not sweep:
        raise InputError("IDS: give job ids (or prefixes), or --sweep")
    target = _output_path(output) if output else None
    url = _url()
    found = _select(refs, None, sweep, None, url)
    if compare:
        from service.sweeps import compare as compare_jobs

        if len(found) != 2 or sweep:
            raise InputError("--compare: give exactly two job ids")
        click.echo(render(compare_jobs(*found), ("field", "a", "b", "change"), fmt))
        return
    if history:
        with db.transaction(url) as session:
            frame = jobs.history_frame([j.id for j in found], session=session)
        rows: list[dict[str, Any]] = [
            {str(k): v for k, v in record.items()} for record in frame.to_dict("records")
        ]
        columns: Sequence[str] = [str(c) for c in frame.columns]
    else:
        rows = [jobs.result_row(j) for j in found]
        columns = list(rows[0]) if rows and all_columns else list(RESULT_COLUMNS)
        if fmt == "table":
            for row in rows:
                row["id"] = row["id"][:12]
    for row in rows:
        for key, value in row.items():
            if isinstance(value, float) and math.isnan(value):
                row[key] = None
    text = render(rows, columns, fmt)
    if fmt == "table" and not history and not output and len(found) == 1:
        from service.views import loss_line

        with db.transaction(url) as session:
            frame = jobs.history_frame([found[0].id], session=session)
        text += "\n" + loss_line(found[0].id, [float(v) for v in frame["train_loss"]])
    if target is not None:
        _write_output(target, lambda path: path.write_text(text + "\n"))
        click.echo(f"wrote {len(rows)} rows to {output}", err=True)
    else:
        click.echo(text)


@main.command("sweeps")
@click.option("--format", "fmt", type=FORMATS, default="table")
def sweeps_list(fmt: str) -> None:
    """One line per sweep, newest first: size, jobs per state, the best value, age."""
    from service import sweeps as sweeps_module
    from service import views

    with db.transaction(_url()) as session:
        rows = sweeps_module.list_sweeps(session=session)
    if fmt != "table":
        click.echo(render(rows, sweeps_module.SWEEP_COLUMNS, fmt))
        return
    shown = [
        {
            "id": row["id"][:12],
            "name": row["name"],
            "size": row["size"],
            "states": ", ".join(f"{row[s]} {s}" for s in STATE_CHOICE.choices if row[s]),
            "best": ""
            if row["best_value"] is None
            else f"{row['best_metric']} {row['best_value']:.6g}",
            "age": views.age(row["created_at"]),
        }
        for row in rows
    ]
    click.echo(render(shown, ("id", "name", "size", "states", "best", "age"), fmt))


@main.group(cls=LrqGroup)
def sweep() -> None:
    """One sweep's grid points."""


@sweep.command("show")
@click.argument("ref", metavar="SWEEP")
@click.option("--sort", default=None, help="Order by a metric, lowest first (e.g. test_loss).")
@click.option("--format", "fmt", type=FORMATS, default="table")
def sweep_show(ref: str, sort: str | None, fmt: str) -> None:
    """One row per grid point: the varied parameters, losses, optimum gap, epochs, time."""
    from service import sweeps as sweeps_module

    with db.transaction(_url()) as session:
        found_sweep, found = sweeps_module.sweep_jobs(
            jobs.resolve_sweep(ref, session=session), session=session
        )
        rows = sweeps_module.point_rows(found_sweep, found, sort=sort)
        columns = sweeps_module.point_columns(found_sweep)
    if fmt == "table":
        for row in rows:
            row["id"] = row["id"][:12]
            row["best"] = "*" if row["best"] else ""
    click.echo(render(rows, columns, fmt))


# -- cancel, retry, reconcile ---------------------------------------------------------------


@main.command()
@click.argument("refs", nargs=-1, required=True, metavar="IDS...")
def cancel(refs: tuple[str, ...]) -> None:
    """Cancel jobs: queued ones never start; running ones stop at their next record."""
    url = _url()
    with db.transaction(url) as session:
        outcome = jobs.cancel_jobs(jobs.resolve_ids(refs, session=session), session=session)
    for job_id, what in outcome.items():
        click.echo(f"{job_id[:12]}  {what}")


@main.command()
@click.argument("refs", nargs=-1, required=True, metavar="IDS...")
def retry(refs: tuple[str, ...]) -> None:
    """Queue failed, diverged or cancelled jobs again, from the start."""
    from service import dispatch

    settings = _settings()
    url = _url()
    with db.transaction(url) as session:
        ids = jobs.resolve_ids(refs, session=session)
        try:
            again = jobs.retry_jobs(ids, session=session)
        except StateError as exc:
            raise InputError(str(exc)) from None  # asking to retry a finished job is bad input
        pairs = [(j.id, j.queue) for j in again]
    dispatch.publish_jobs(_app(), settings, pairs)
    for job_id, _ in pairs:
        click.echo(f"{job_id[:12]}  queued")


@main.command()
def reconcile() -> None:
    """Reclaim jobs of dead workers and republish queued jobs the broker lost."""
    from service import dispatch

    report = dispatch.reconcile_once(_app(), _settings())
    click.echo(
        f"requeued {len(report.requeued)}, failed {len(report.failed)}, "
        f"published {len(report.published)}"
    )


# -- worker ---------------------------------------------------------------------------------


def _parse_gpus(value: str | None) -> list[int] | None:
    if value is None:
        return None
    if value == "all":
        from workers.pool import visible_gpus

        return visible_gpus()
    try:
        gpus = [int(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter("expected 'all' or comma-separated GPU indices") from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise click.BadParameter("GPU indices must be distinct and >= 0")
    return gpus


@main.command()
@click.option(
    "--queues", default=None, help="Comma-separated queues [default: cpu, or gpu with --gpus]."
)
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--gpus", default=None, help="'all' or indices: one worker process per GPU.")
@click.option("--name", default=None, help="Worker name (default: lrq-<queues>@<host>).")
@click.option("--loglevel", default="INFO", show_default=True)
def worker(
    queues: str | None, concurrency: int, gpus: str | None, name: str | None, loglevel: str
) -> None:
    """Run a worker on this host (or a pool of GPU workers with --gpus)."""
    from workers.pool import run_gpu_pool, run_worker

    default = "gpu" if gpus else "cpu"
    names = [q.strip() for q in (queues or default).split(",") if q.strip()]
    if not names:
        raise click.BadParameter("give at least one queue", param_hint="--queues")
    settings = _settings()
    db.use_worker_sessions()
    db.check_schema(settings.resolved_database_url())
    gpu_list = _parse_gpus(gpus)
    if gpu_list is not None:
        sys.exit(run_gpu_pool(gpu_list, queues=names, loglevel=loglevel))
    run_worker(settings, queues=names, concurrency=concurrency, name=name, loglevel=loglevel)


# -- database and datasets ------------------------------------------------------------------


@main.group(cls=LrqGroup)
def db_group() -> None:
    """The database schema."""


main.add_command(db_group, name="db")


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Create or migrate the schema to the newest revision."""
    url = _url(check=False)
    db.upgrade(url, revision)
    click.echo(f"{db.mask_url(url)} at revision {db.current_revision(url)}")


@db_group.command("current")
def db_current() -> None:
    """Show the schema's revision and the newest one."""
    url = _url(check=False)
    click.echo(f"{db.mask_url(url)}: {db.current_revision(url)} (head {db.head_revision(url)})")


@main.group(cls=LrqGroup)
def datasets() -> None:
    """Registered datasets, stored in the database for every worker."""


@datasets.command("add")
@click.argument("file", type=click.Path())
@click.option("--target", required=True, help="The target column.")
@click.option("--features", default=None, help="Comma-separated feature columns (default all).")
@click.option("--name", default=None, help="A name to refer to it by (default the file name).")
def datasets_add(file: str, target: str, features: str | None, name: str | None) -> None:
    """Register a CSV or Parquet file (content-addressed: the same content is stored once)."""
    from service.datasets import check_label, read_table, safe_path, split_features

    settings = _settings()
    check_label(target, "--target")
    chosen = split_features(features) if features is not None else None
    if name is not None:
        check_label(name, "--name")
    url = _url()
    path = safe_path(file, settings.resolved_data_dir())
    if name is None:
        name = check_label(path.name, "the file name (the default --name)")
    table = read_table(
        path,
        target=target,
        features=chosen,
        max_bytes=settings.max_dataset_bytes,
        max_rows=settings.max_rows,
        max_features=settings.max_features,
    )
    with db.transaction(url) as session:
        dataset = jobs.register_dataset(table, name=name, session=session)
        click.echo(
            f"{dataset.id}  {dataset.name}  {dataset.n_rows} rows  {len(dataset.features)} features"
        )


@datasets.command("list")
@click.option("--format", "fmt", type=FORMATS, default="table")
def datasets_list(fmt: str) -> None:
    """List registered datasets."""
    with db.transaction(_url()) as session:
        rows = [
            {
                "id": d.id[:12] if fmt == "table" else d.id,
                "name": d.name,
                "target": d.target,
                "features": d.features,
                "rows": d.n_rows,
                "bytes": d.n_bytes,
                "created": d.created_at,
            }
            for d in jobs.list_datasets(session=session)
        ]
    click.echo(render(rows, ("id", "name", "target", "features", "rows", "bytes", "created"), fmt))


@datasets.command("show")
@click.argument("ref", metavar="NAME")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def datasets_show(ref: str, fmt: str) -> None:
    """Shape, columns, summary statistics and the least-squares fit of a dataset."""
    from service.dataset_views import STAT_COLUMNS, describe

    with db.transaction(_url()) as session:
        summary = describe(jobs.find_dataset(ref, session=session))
    if fmt == "json":
        click.echo(json.dumps(summary, default=_json_default, indent=2))
        return
    fit = summary["fit"]
    click.echo(f"{summary['name']}  {summary['id'][:12]}  {summary['rows']} rows x "
               f"{summary['features']} features, target {summary['target']}")  # fmt: skip
    click.echo(render(summary["columns"], STAT_COLUMNS, "table"))
    r2 = "" if fit["r2"] is None else f"  r2 {fit['r2']:.6g}"
    click.echo(f"least squares: bias {fit['bias']:.6g}  mse per row {fit['mse']:.6g}{r2}")


@datasets.command("rm")
@click.argument("ref", metavar="NAME")
def datasets_rm(ref: str) -> None:
    """Remove a dataset (refused while a job refers to it)."""
    from service.dataset_views import remove

    with db.transaction(_url()) as session:
        gone = remove(ref, session=session)
        click.echo(f"removed {gone.id[:12]}  {gone.name}")


# -- info, plot, demo -----------------------------------------------------------------------


@main.command()
def info() -> None:
    """Where lrq points, queue lengths, live workers and jobs per state (no secrets shown)."""
    from sqlalchemy.exc import DBAPIError

    from service.monitor import worker_details, worker_line
    from service.queue import live_workers, mask_broker_url, queue_lengths

    settings = _settings()
    url = settings.resolved_database_url()
    app = _app()
    click.echo(f"database  {db.mask_url(url)}")
    click.echo(f"broker    {mask_broker_url(settings.resolved_broker_url())}")
    try:
        db.check_schema(url)
        with db.transaction(url) as session:
            counts = jobs.queue_counts(session=session)
        click.echo(
            "jobs      " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none")
        )
    except LrqError as exc:
        click.echo(f"jobs      unavailable: {exc}")
    except DBAPIError as exc:
        click.echo(f"jobs      unavailable: {type(exc.orig or exc).__name__}")
    try:
        lengths = queue_lengths(app)
        click.echo(
            "queues    " + ", ".join(f"{k} {'?' if v is None else v}" for k, v in lengths.items())
        )
        details = worker_details(app)
        names = [w.name for w in details] or live_workers(app)
        click.echo("workers   " + (", ".join(names) if names else "none answering"))
        for detail in details:
            click.echo(worker_line(detail))
    except Exception as exc:
        click.echo(f"queues    unavailable: {type(exc).__name__}")


#: Image formats `lrq plot -o` writes (matplotlib picks the format from the suffix).
PLOT_FORMATS = (".png", ".pdf", ".svg")


@main.command()
@click.argument("refs", nargs=-1, metavar="IDS...")
@click.option("--sweep", default=None, help="Every job of a sweep, coloured by what it varies.")
@click.option(
    "-o", "--output", default="losses.png", show_default=True, help="A .png, .svg or .pdf file."
)
@click.option("--log/--linear", "log_scale", default=True, show_default=True)
@click.option(
    "--y",
    "y_axis",
    type=click.Choice(["loss", "gap"]),
    default="loss",
    show_default=True,
    help="Loss per row, or its distance to the least-squares optimum.",
)
@click.option("--test", is_flag=True, help="Add the test losses, dashed.")
@click.option("--terminal", is_flag=True, help="Draw the curves here, as text.")
def plot(
    refs: tuple[str, ...],
    sweep: str | None,
    output: str,
    log_scale: bool,
    y_axis: str,
    test: bool,
    terminal: bool,
) -> None:
    """Plot loss histories (mean squared error per row) of jobs or a sweep."""
    import shutil

    from service import plots
    from service.models import Dataset, Sweep

    if not refs and not sweep:
        raise InputError("IDS: give job ids (or prefixes), or --sweep")
    if test and y_axis == "gap":
        raise InputError("--test: only with --y loss (the optimum is the training rows')")
    target = None
    if not terminal:
        target = _output_path(output, PLOT_FORMATS)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InputError("plot: needs matplotlib (pip install 'lrq[plot]')") from None
    url = _url()
    found = _select(refs, None, sweep, None, url)
    with db.transaction(url) as session:
        frame = jobs.history_frame([j.id for j in found], session=session)
        dataset_ids = {j.dataset_id for j in found if j.dataset_id}
        dataset_rows = {
            d.id: d.n_rows for d in (session.get(Dataset, i) for i in dataset_ids) if d is not None
        }
        varied: list[str] = []
        title = ""
        if sweep:
            from service.sweeps import axes

            found_sweep = session.get(Sweep, jobs.resolve_sweep(sweep, session=session))
            assert found_sweep is not None
            varied = [path for path, _ in axes(found_sweep)]
            title = f"sweep {found_sweep.name} ({found_sweep.id[:8]}): {len(found)} jobs"
    lines = plots.curves(found, frame, y=y_axis, dataset_rows=dataset_rows, varied=varied)
    if not lines:
        raise InputError("IDS: no epochs recorded yet for these jobs")
    if terminal:
        size = shutil.get_terminal_size((100, 30))
        click.echo(
            plots.text_plot(
                lines,
                log=log_scale,
                y=y_axis,
                test=test,
                width=size.columns,
                height=size.lines - 2,
                colour=sys.stdout.isatty(),
            )
        )
        return
    assert target is not None
    fig = plots.figure(lines, varied=varied, log=log_scale, y=y_axis, test=test, title=title)
    _write_output(target, lambda path: plots.save(fig, str(path)))
    click.echo(f"wrote {output} ({len(lines)} curves)")


@main.command()
@click.option(
    "--home",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory for the demo's database and broker (default: <lrq home>/demo).",
)
def demo(home: str | None) -> None:
    """Run the tutorial's two jobs through submit, queue, worker and database, in one process."""
    from service.demo import run_demo

    root = Path(home) if home else _settings().home / "demo"
    sys.exit(run_demo(root, echo=click.echo))


if __name__ == "__main__":
    main()
