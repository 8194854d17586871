"""Sweeps as a whole: their jobs in grid order, one row per grid point, listing and comparing."""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service import jobs
from service.errors import InputError
from service.models import STATES, Job, Sweep

if TYPE_CHECKING:
    import pandas as pd

#: Metrics a sweep can be sorted by; lower is better for each.
METRICS = ("train_loss", "test_loss", "optimum_gap", "final_loss", "best_loss", "train_seconds")

#: The result columns of `lrq sweep show`, after the varied parameters.
POINT_COLUMNS = (
    "train_loss",
    "test_loss",
    "optimum_gap",
    "epochs_done",
    "train_seconds",
    "state",
    "id",
)


def axes(sweep: Sweep) -> list[tuple[str, list[Any]]]:
    """The sweep's varied parameters (dotted paths) and their values, in grid order."""
    from service.spec import parse_grid

    return [(".".join(parts), values) for parts, values in parse_grid(sweep.grid)]


#: What ``_lookup`` finds where a path is absent (None is a value a grid may hold).
MISSING = object()


def _lookup(document: Mapping[str, Any], path: str, default: Any = None) -> Any:
    node: Any = document
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _same(a: Any, b: Any) -> bool:
    # Both come from JSON, but a grid value 1 may be stored as 1.0 after validation.
    if a is MISSING or b is MISSING:
        return False
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return bool(a == b)


def grid_position(sweep: Sweep, job: Job) -> tuple[int, ...]:
    """The job's index along each axis, from the value its spec holds (the label in its name
    when the spec no longer shows it, e.g. a data path pinned to a dataset)."""
    position = []
    for path, values in axes(sweep):
        held = _lookup(job.spec, path, MISSING)
        index = next((i for i, v in enumerate(values) if _same(v, held)), None)
        if index is None:
            label = f"{path.rsplit('.', 1)[-1]}="
            inside = job.name.partition("[")[2].rstrip("]").split(",")
            texts = [item[len(label) :] for item in inside if item.startswith(label)]
            index = next((i for i, v in enumerate(values) if texts and str(v) == texts[0]), None)
        position.append(len(values) if index is None else index)
    return tuple(position)


def in_grid_order(found: Sequence[Job], *, session: Session) -> list[Job]:
    """Jobs of sweeps in each sweep's grid order (sweeps by age); other jobs keep their order."""
    sweep_ids = {job.sweep_id for job in found if job.sweep_id}
    if not sweep_ids:
        return list(found)
    sweeps = {s.id: s for s in session.scalars(select(Sweep).where(Sweep.id.in_(sweep_ids)))}
    first: dict[str, int] = {}
    for index, job in enumerate(found):
        first.setdefault(job.sweep_id or job.id, index)

    def key(pair: tuple[int, Job]) -> tuple[int, tuple[int, ...], int]:
        index, job = pair
        sweep = sweeps.get(job.sweep_id or "")
        if sweep is None:
            return (first[job.id], (), index)
        return (first[sweep.id], grid_position(sweep, job), index)

    return [job for _, job in sorted(enumerate(found), key=key)]


def sweep_jobs(sweep_id: str, *, session: Session) -> tuple[Sweep, list[Job]]:
    sweep = session.get(Sweep, sweep_id)
    assert sweep is not None  # resolved by the caller
    found = jobs.find_jobs(session=session, sweep_id=sweep_id)
    return sweep, sorted(found, key=lambda job: grid_position(sweep, job))


def _finite(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def point_rows(
    sweep: Sweep, found: Sequence[Job], *, sort: str | None = None
) -> list[dict[str, Any]]:
    """One typed row per grid point: the varied parameters, then the results; ``best`` marks the
    lowest ``sort`` metric (test loss, else train loss, when not given)."""
    if sort is not None and sort not in METRICS:
        raise InputError(f"--sort: {sort!r} is not one of {', '.join(METRICS)}")
    names = [path for path, _ in axes(sweep)]
    rows = []
    for job in found:
        summary = job.result or {}
        row: dict[str, Any] = {path: _lookup(job.spec, path) for path in names}
        row.update(
            train_loss=_finite(summary.get("train_loss")),
            test_loss=_finite(summary.get("test_loss")),
            optimum_gap=_finite(summary.get("optimum_gap")),
            final_loss=_finite(summary.get("final_loss")),
            best_loss=_finite(summary.get("best_loss")),
            epochs_done=job.epochs_done,
            train_seconds=_finite(summary.get("train_seconds")),
            state=job.state,
            id=job.id,
        )
        rows.append(row)
    metric = sort or (
        "test_loss" if any(r["test_loss"] is not None for r in rows) else "train_loss"
    )
    scored = [r for r in rows if r[metric] is not None and r["state"] == "succeeded"]
    best = min(scored, key=lambda r: r[metric]) if scored else None
    for row in rows:
        row["best"] = row is best
    if sort is not None:
        rows.sort(key=lambda r: (r[sort] is None, r[sort] if r[sort] is not None else 0.0))
    return rows


def point_columns(sweep: Sweep) -> list[str]:
    return [path for path, _ in axes(sweep)] + list(POINT_COLUMNS) + ["best"]


def sweep_frame(sweep_ref: str, *, url: str | None = None, sort: str | None = None) -> pd.DataFrame:
    """A sweep as a DataFrame: one row per grid point, in grid order (or sorted by a metric)."""
    import pandas as pd

    from service import db
    from service.settings import get_settings

    with db.transaction(url or get_settings().resolved_database_url()) as session:
        sweep, found = sweep_jobs(jobs.resolve_sweep(sweep_ref, session=session), session=session)
        rows = point_rows(sweep, found, sort=sort)
        columns = point_columns(sweep)
    return pd.DataFrame(rows, columns=columns)


def list_sweeps(*, session: Session, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """One typed row per sweep, newest first: size, counts per state, best value."""
    sweeps = list(session.scalars(select(Sweep).order_by(Sweep.created_at.desc(), Sweep.id)))
    counts: dict[str, Counter[str]] = {s.id: Counter() for s in sweeps}
    for sweep_id, state, count in session.execute(
        select(Job.sweep_id, Job.state, func.count())
        .where(Job.sweep_id.is_not(None))
        .group_by(Job.sweep_id, Job.state)
    ):
        counts.setdefault(str(sweep_id), Counter())[state] = int(count)
    succeeded: dict[str, list[Job]] = {s.id: [] for s in sweeps}
    for job in session.scalars(
        select(Job).where(Job.sweep_id.in_(list(succeeded)) & (Job.state == "succeeded"))
    ):
        succeeded[str(job.sweep_id)].append(job)
    rows = []
    for sweep in sweeps:
        best = [r for r in point_rows(sweep, succeeded[sweep.id]) if r["best"]]
        metric = "test_loss" if best and best[0]["test_loss"] is not None else "train_loss"
        tally = counts[sweep.id]
        rows.append(
            {
                "id": sweep.id,
                "name": sweep.name,
                "size": sum(tally.values()),
                **{state: tally[state] for state in STATES},
                "best_metric": metric if best else None,
                "best_value": best[0][metric] if best else None,
                "best_id": best[0]["id"] if best else None,
                "created_at": sweep.created_at,
            }
        )
    return rows


SWEEP_COLUMNS = (
    "id",
    "name",
    "size",
    *STATES,
    "best_metric",
    "best_value",
    "best_id",
    "created_at",
)


def compare(first: Job, second: Job) -> list[dict[str, Any]]:
    """The fields where two jobs differ: spec parameters, then results."""
    from service.spec import flatten

    rows = []
    a, b = flatten(first.spec), flatten(second.spec)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            rows.append({"field": f"spec.{key}", "a": a.get(key), "b": b.get(key), "change": None})
    ra, rb = first.result or {}, second.result or {}
    for key in jobs.SUMMARY_FIELDS:
        va, vb = (
            (first.epochs_done, second.epochs_done)
            if key == "epochs_done"
            else (ra.get(key), rb.get(key))
        )
        if va == vb:
            continue
        fa, fb = _finite(va), _finite(vb)
        rows.append(
            {
                "field": key,
                "a": va,
                "b": vb,
                "change": None if fa is None or fb is None else fb - fa,
            }
        )
    if first.state != second.state:
        rows.append({"field": "state", "a": first.state, "b": second.state, "change": None})
    return rows
