"""Turning a spec file (plus --set and --grid) into recorded jobs, refusing bad input first."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from service import jobs, spec
from service.errors import DataError, InputError
from service.models import Dataset, Job
from service.routing import AutoRouter
from service.settings import Settings

#: The length of the jobs.queue column (service/models.py).
MAX_QUEUE_LENGTH = 64


def check_queue_name(queue: str) -> None:
    """Refuse a --queue the broker or the database could not take."""
    if len(queue) > MAX_QUEUE_LENGTH:
        raise InputError(f"--queue: {len(queue)} characters, more than {MAX_QUEUE_LENGTH}")
    if not queue.isascii() or not queue.replace("-", "").replace("_", "").isalnum():
        raise InputError(f"--queue: {queue!a} is not a queue name (letters, digits, - and _)")


@dataclass(frozen=True)
class Submission:
    jobs: list[Job]
    sweep_id: str | None


def _resolve_data(
    job: spec.JobSpec,
    *,
    session: Session,
    settings: Settings,
    registered: dict[tuple[str, str | None, tuple[str, ...] | None], Dataset],
    spec_dir: Path | None,
) -> spec.JobSpec:
    """The spec with its data pinned to a registered dataset (files are registered here)."""
    data = job.data
    if data.synthetic is not None:
        spec.check_limits(job, settings)
        return job
    from service import datasets  # numpy: not needed by a synthetic spec's submit

    if data.path is not None:
        # Grid points usually share one file: read and store it once.
        key = (data.path, data.target, tuple(data.features) if data.features else None)
        dataset = registered.get(key)
        if dataset is None:
            path = datasets.safe_path(data.path, settings.resolved_data_dir(), base=spec_dir)
            table = datasets.read_table(
                path,
                target=data.target or "",
                features=data.features,
                max_bytes=settings.max_dataset_bytes,
                max_rows=settings.max_rows,
                max_features=settings.max_features,
            )
            dataset = jobs.register_dataset(table, name=Path(data.path).name, session=session)
            registered[key] = dataset
    else:
        assert data.dataset is not None
        dataset = jobs.find_dataset(data.dataset, session=session)
    return _pin(job, dataset, settings)


def _pin(job: spec.JobSpec, dataset: Dataset, settings: Settings) -> spec.JobSpec:
    data = job.data
    if data.target is not None and data.target != dataset.target:
        raise DataError(
            f"data.target: dataset {dataset.name!r} has target {dataset.target!r}, "
            f"not {data.target!r}"
        )
    features = list(data.features or dataset.features)
    unknown = [f for f in features if f not in dataset.features]
    if unknown:
        raise DataError(f"data.features: {', '.join(map(repr, unknown))} not in dataset columns")
    rows = dataset.n_rows
    spec.check_limits(job, settings, rows=rows, features=len(features))
    train_rows = rows
    if data.test is not None and data.test.fraction is not None:
        train_rows -= spec.held_out_rows(rows, data.test.fraction)
    if job.batch_size is not None and job.batch_size > train_rows:
        raise DataError(f"batch_size: {job.batch_size} is more than the {train_rows} training rows")
    init = job.model.init
    if isinstance(init, spec.ExplicitInit) and len(init.weights) != len(features):
        raise DataError(
            f"model.init.weights: expected {len(features)} values (the features), "
            f"got {len(init.weights)}"
        )
    document = job.to_json()
    document["data"].update(path=None, dataset=dataset.id, target=dataset.target, features=features)
    return spec.JobSpec.model_validate(document)


def _shape(job: spec.JobSpec, session: Session) -> tuple[int, int]:
    """Training rows and features of a pinned spec."""
    data = job.data
    if data.synthetic is not None:
        return job.n_train_rows(), data.synthetic.n_features
    dataset = session.get(Dataset, data.dataset)
    assert dataset is not None  # pinned above
    rows = dataset.n_rows
    if data.test is not None and data.test.fraction is not None:
        rows -= spec.held_out_rows(rows, data.test.fraction)
    return rows, len(data.features or dataset.features)


def submit(
    document: dict[str, Any],
    *,
    overrides: Sequence[str],
    grid: Sequence[str],
    queue: str | None,
    settings: Settings,
    session: Session,
    gpu_live: Callable[[], bool] | None = None,
    spec_dir: Path | None = None,
    pack: bool = True,
) -> Submission:
    """Validate everything, register data files, then insert the jobs (not yet published).

    ``gpu_live`` says whether a GPU worker is up; with it, ``device: auto`` jobs large enough
    to gain from a GPU go to the gpu queue. A relative ``data.path`` is taken from
    ``spec_dir``, the spec file's directory. ``pack``: a sweep's jobs that share their data
    may be trained together, where that is exact (the worker decides which)."""
    document = spec.apply_overrides(document, overrides)
    specs = spec.expand(document, grid, max_points=settings.max_grid_points)
    if queue is not None:
        check_queue_name(queue)
    registered: dict[tuple[str, str | None, tuple[str, ...] | None], Dataset] = {}
    pinned = [
        _resolve_data(
            s, session=session, settings=settings, registered=registered, spec_dir=spec_dir
        )
        for s in specs
    ]
    created = jobs.create_jobs(
        pinned,
        session=session,
        max_attempts=settings.max_attempts,
        queue=queue,
        sweep=(document, list(grid)) if grid else None,
        pack=pack,
    )
    if queue is None and gpu_live is not None:
        router = AutoRouter(gpu_live)
        for job_spec, job in zip(pinned, created, strict=True):
            if job_spec.device == "auto":
                rows, features = _shape(job_spec, session)
                job.queue = router.queue(
                    job_spec,
                    rows=rows,
                    features=features,
                    min_elements=settings.auto_gpu_min_batch_elements,
                )
        session.flush()
    return Submission(jobs=created, sweep_id=created[0].sweep_id if grid else None)
