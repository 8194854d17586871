"""`lrq datasets show` and `rm`: a registered dataset's shape, statistics and least-squares fit,
and removing one no job refers to."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service import jobs
from service.errors import StateError
from service.models import Dataset, Job

STAT_COLUMNS = ("column", "role", "mean", "std", "min", "max", "coefficient")


def describe(dataset: Dataset) -> dict[str, Any]:
    """Shape, per-column statistics and the least-squares fit with an intercept, typed."""
    import numpy as np

    from service.datasets import decode

    table = decode(dataset.content)
    design = np.column_stack([table.x, np.ones(table.n_rows)])
    solution, *_ = np.linalg.lstsq(design, table.y, rcond=None)
    residual = table.y - design @ solution
    mse = float(residual @ residual) / table.n_rows
    variance = float(np.var(table.y))
    columns = []
    for index, name in enumerate([*table.columns, table.target]):
        values = table.x[:, index] if index < len(table.columns) else table.y
        columns.append(
            {
                "column": name,
                "role": "feature" if index < len(table.columns) else "target",
                "mean": float(values.mean()),
                "std": float(values.std()),
                "min": float(values.min()),
                "max": float(values.max()),
                "coefficient": float(solution[index]) if index < len(table.columns) else None,
            }
        )
    return {
        "id": dataset.id,
        "name": dataset.name,
        "rows": table.n_rows,
        "features": len(table.columns),
        "target": table.target,
        "bytes": dataset.n_bytes,
        "created_at": dataset.created_at,
        "columns": columns,
        "fit": {
            "weights": [float(w) for w in solution[:-1]],
            "bias": float(solution[-1]),
            "mse": mse,
            "r2": None if variance == 0 else 1.0 - mse / variance,
        },
    }


def remove(ref: str, *, session: Session) -> Dataset:
    """Delete a dataset no job refers to; StateError naming the jobs that still do."""
    dataset = jobs.find_dataset(ref, session=session)
    users = int(session.scalar(select(func.count()).where(Job.dataset_id == dataset.id)) or 0)
    if users:
        example = session.scalar(select(Job.id).where(Job.dataset_id == dataset.id).limit(1))
        raise StateError(
            f"datasets rm: {dataset.name!r} is used by {users} job(s) (e.g. {str(example)[:12]}); "
            "it stays while a job refers to it"
        )
    session.delete(dataset)
    session.flush()
    return dataset
