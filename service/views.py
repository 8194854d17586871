"""What `lrq status` and `lrq submit --wait` show: typed rows, display rows and the live watch."""

from __future__ import annotations

import datetime as dt
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from service.models import STATES, TERMINAL

if TYPE_CHECKING:
    from rich.console import RenderableType
    from sqlalchemy.orm import Session

    from service.models import Job

#: The typed fields of `lrq status --format json|csv`, in order.
STATUS_FIELDS = (
    "id",
    "name",
    "sweep_id",
    "backend",
    "device",
    "queue",
    "state",
    "epochs_done",
    "epochs_total",
    "last_loss",
    "attempts",
    "worker",
    "error",
    "created_at",
    "started_at",
    "finished_at",
)

#: The columns of the `lrq status` table (display strings).
TABLE_COLUMNS = ("id", "name", "backend", "device", "state", "epoch", "last_loss", "worker", "age")

#: Jobs `lrq status` lists without --limit or --all.
DEFAULT_LIMIT = 20

#: More jobs than this are shown by `submit --wait` as one bar per sweep.
GROUP_ABOVE = 8


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def status_record(job: Job) -> dict[str, Any]:
    """One job with typed values: integers, floats, datetimes and None, never display text."""
    return {field: getattr(job, field) for field in STATUS_FIELDS}


def age(when: dt.datetime | None, now: dt.datetime | None = None) -> str:
    """``11s``, ``4m``, ``2h``, ``3d``: how long ago."""
    if when is None:
        return ""
    seconds = int(((now or _utcnow()) - when).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def table_row(job: Job, now: dt.datetime | None = None) -> dict[str, Any]:
    """One job as the status table shows it."""
    return {
        "id": job.id[:12],
        "name": job.name,
        "backend": job.backend,
        "device": job.device,
        "state": job.state,
        "epoch": f"{job.epochs_done}/{job.epochs_total}",
        "last_loss": job.last_loss,
        "worker": job.worker or "",
        "age": age(job.created_at, now),
    }


def select_page(
    session: Session,
    *,
    refs: Sequence[str] = (),
    state: str | None = None,
    sweep: str | None = None,
    name: str | None = None,
    limit: int | None = None,
) -> tuple[list[Job], int]:
    """The jobs `lrq status` shows (a sweep in grid order, others newest first) and how many
    matching jobs the limit left out."""
    from sqlalchemy import func, select

    from service import jobs
    from service.models import Job
    from service.sweeps import in_grid_order

    ids = jobs.resolve_ids(refs, session=session) if refs else None
    sweep_id = jobs.resolve_sweep(sweep, session=session) if sweep else None
    found = jobs.find_jobs(
        session=session, ids=ids, state=state, sweep_id=sweep_id, name=name, limit=limit
    )
    left_out = 0
    if limit is not None and len(found) == limit:
        query = select(func.count()).select_from(Job)
        if ids is not None:
            query = query.where(Job.id.in_(ids))
        if state is not None:
            query = query.where(Job.state == state)
        if sweep_id is not None:
            query = query.where(Job.sweep_id == sweep_id)
        if name is not None:
            query = query.where(Job.name == name)
        left_out = int(session.scalar(query) or 0) - len(found)
    if sweep_id is not None:
        return in_grid_order(found, session=session), left_out
    return found[::-1], left_out


def left_out_line(left_out: int) -> str:
    return f"... {left_out} older job(s) not shown (--limit N or --all)"


def state_counts(jobs: Sequence[Job]) -> str:
    """``2 running, 1 queued, 5 succeeded``: non-zero counts in state order."""
    counts = Counter(job.state for job in jobs)
    return ", ".join(f"{counts[s]} {s}" for s in STATES if counts[s]) or "no jobs"


def all_finished(jobs: Sequence[Job]) -> bool:
    return all(job.state in TERMINAL for job in jobs)


@dataclass(frozen=True)
class Pace:
    """Epochs per second since the attempt started, and the seconds left at that pace."""

    rate: float | None
    seconds_left: float | None


def pace(job: Job, now: dt.datetime | None = None) -> Pace:
    if job.state != "running" or job.started_at is None or job.epochs_done <= 0:
        return Pace(None, None)
    elapsed = ((now or _utcnow()) - job.started_at).total_seconds()
    if elapsed <= 0:
        return Pace(None, None)
    rate = job.epochs_done / elapsed
    return Pace(rate, max(job.epochs_total - job.epochs_done, 0) / rate)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _loss(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float | None], width: int = 60) -> str:
    """The values as block characters, ``width`` at most (bucket means), log-scaled when all are
    positive; non-finite values show as spaces."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return ""
    count = min(width, len(values))
    buckets: list[float | None] = []
    for index in range(count):
        start, stop = index * len(values) // count, (index + 1) * len(values) // count
        chunk = [v for v in values[start:stop] if v is not None and math.isfinite(v)]
        buckets.append(sum(chunk) / len(chunk) if chunk else None)
    log = min(finite) > 0

    def scale(v: float) -> float:
        return math.log10(v) if log else v

    scaled = [None if b is None else scale(b) for b in buckets]
    known = [v for v in scaled if v is not None]
    low, high = min(known), max(known)
    span = high - low
    out = []
    for v in scaled:
        if v is None:
            out.append(" ")
        else:
            level = 0 if span == 0 else round((v - low) / span * (len(SPARK) - 1))
            out.append(SPARK[level])
    return "".join(out)


def loss_line(job_id: str, losses: Sequence[float | None]) -> str:
    """``loss 1.2 ▇▅▃▂▁ 0.0023  (1000 epochs, log scale)`` for a job's train losses."""
    if not losses:
        return f"loss  {job_id[:12]}: no epochs recorded"
    finite = [v for v in losses if v is not None and math.isfinite(v)]
    scale = "log scale" if finite and min(finite) > 0 else "linear scale"
    return (
        f"loss  {_loss(losses[0])} {sparkline(losses)} {_loss(losses[-1])}"
        f"  ({len(losses)} epochs, {scale})"
    )


# -- the live view (rich) -------------------------------------------------------------------

STATE_STYLES = {
    "queued": "dim",
    "running": "cyan",
    "succeeded": "green",
    "failed": "red",
    "diverged": "magenta",
    "cancelled": "yellow",
}


def live_table(
    jobs: Sequence[Job], *, height: int, left_out: int = 0, now: dt.datetime | None = None
) -> RenderableType:
    """A table with a progress bar per job, cut to ``height`` lines with a count of the rest."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    now = now or _utcnow()
    # Running jobs first: they are what a person watches.
    ordered = sorted(jobs, key=lambda j: (j.state != "running", j.state in TERMINAL))
    room = max(height - 6, 1)  # header, rule, summary and the "more" line
    shown = ordered[:room]
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("id", "name", "state", "progress", "epoch", "ep/s", "left", "loss", "worker"):
        table.add_column(column, no_wrap=True, justify="right" if column == "ep/s" else "left")
    for job in shown:
        speed = pace(job, now)
        bar = ProgressBar(total=max(job.epochs_total, 1), completed=job.epochs_done, width=24)
        table.add_row(
            job.id[:12],
            job.name,
            Text(job.state, style=STATE_STYLES.get(job.state, "")),
            bar,
            f"{job.epochs_done}/{job.epochs_total}",
            "" if speed.rate is None else f"{speed.rate:.3g}",
            _duration(speed.seconds_left),
            _loss(job.last_loss),
            job.worker or "",
        )
    parts: list[RenderableType] = [table]
    hidden = len(ordered) - len(shown) + left_out
    if hidden:
        parts.append(Text(f"... and {hidden} more job(s)", style="dim"))
    parts.append(Text(state_counts(jobs), style="bold"))
    return Group(*parts)


def sweep_bars(jobs: Sequence[Job]) -> RenderableType:
    """One bar per sweep (jobs outside a sweep share one): finished out of all, per state."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.sweep_id or "-", []).append(job)
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("sweep", "progress", "done", "states", "epochs"):
        table.add_column(column, no_wrap=True)
    for sweep_id, members in groups.items():
        done = sum(job.state in TERMINAL for job in members)
        epochs = sum(job.epochs_done for job in members)
        total = sum(job.epochs_total for job in members)
        table.add_row(
            sweep_id[:12],
            ProgressBar(total=max(total, 1), completed=epochs, width=30),
            f"{done}/{len(members)}",
            state_counts(members),
            f"{epochs}/{total}",
        )
    return Group(table)


# -- the plain view (no terminal) -----------------------------------------------------------


def plain_lines(
    jobs: Sequence[Job], seen: dict[str, tuple[str, int]], now: dt.datetime | None = None
) -> list[str]:
    """A line for each job whose state or epoch changed since ``seen`` (updated in place)."""
    stamp = (now or _utcnow()).isoformat(timespec="seconds")
    lines = []
    for job in jobs:
        key = (job.state, job.epochs_done)
        if seen.get(job.id) == key:
            continue
        seen[job.id] = key
        lines.append(
            f"{stamp}  {job.id[:12]}  {job.state:<9}  {job.epochs_done}/{job.epochs_total}"
            f"  loss {_loss(job.last_loss) or '-'}"
        )
    return lines


# -- watching -------------------------------------------------------------------------------


def watch(
    fetch: Callable[[], tuple[list[Job], int]],
    *,
    stream: IO[str],
    interval: float,
    grouped: bool = False,
    terminal: bool | None = None,
    deadline: float | None = None,
) -> list[Job]:
    """Redraw ``fetch()``'s jobs in place on a terminal (plain lines elsewhere) until every one
    has finished or ``deadline`` (monotonic) passes; returns the last jobs seen."""
    from rich.console import Console
    from rich.live import Live

    console = Console(file=stream, force_terminal=terminal)
    if not console.is_terminal:
        return _watch_plain(fetch, stream=stream, interval=interval, deadline=deadline)

    def view() -> tuple[RenderableType, list[Job]]:
        found, left_out = fetch()
        if grouped:
            return sweep_bars(found), found
        return live_table(found, height=console.size.height, left_out=left_out), found

    renderable, found = view()
    with Live(renderable, console=console, auto_refresh=False, transient=False) as live:
        while not all_finished(found) and (deadline is None or time.monotonic() < deadline):
            time.sleep(interval)
            renderable, found = view()
            live.update(renderable, refresh=True)
    return found


def _watch_plain(
    fetch: Callable[[], tuple[list[Job], int]],
    *,
    stream: IO[str],
    interval: float,
    deadline: float | None,
) -> list[Job]:
    seen: dict[str, tuple[str, int]] = {}
    summary = ""
    while True:
        found, _left_out = fetch()
        for line in plain_lines(found, seen):
            print(line, file=stream, flush=True)
        counts = state_counts(found)
        if counts != summary:
            summary = counts
            print(f"-- {counts}", file=stream, flush=True)
        if all_finished(found) or (deadline is not None and time.monotonic() >= deadline):
            return found
        time.sleep(interval)
