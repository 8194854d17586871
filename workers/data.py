"""Materialise a spec's data as TrainData: synthetic draws, held-out splits, loaded tables.

Synthetic data is drawn exactly as the tutorial draws it, so a spec reproduces its numbers:

- ``numpy``: ``np.random.RandomState(seed)``; one ``normal(0, 1, size=(n, 1))`` column per
  feature, in order; then ``normal(0, 1, size=(n, 1)) * noise_std``; y summed term by term
  (``c1*x1 + c2*x2 + ... + intercept + noise``), as the tutorial writes it, in float64.
- ``torch``: ``torch.Generator().manual_seed(seed)`` (the stream ``torch.manual_seed`` gives);
  ``X = torch.normal(0, 1, (n, d))``, noise ``torch.normal(0, 1, (n, 1)) * noise_std``,
  ``y = X @ w + intercept + noise``, all in float32; returned as float64.

A test ``fraction`` holds out ``held_out_rows(n, fraction)`` rows: the first ones of the
permutation ``np.random.default_rng([spec.seed, 7919, 0]).permutation(n)`` (three seed words, so
the stream differs from every epoch's shuffle, which uses two). Both parts keep the
rows' original order. A test ``n_samples`` is a fresh draw with ``test.seed``, or with the
data's seed + 1 (mod 2**32) when none is given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from service.datasets import Array, Table, read_table, safe_path
from service.errors import DataError
from service.settings import Settings
from service.spec import ExplicitInit, JobSpec, SyntheticData, held_out_rows
from workers.engines.base import TrainData

Indices = npt.NDArray[np.int64]

#: Second seed word of the held-out split: its stream depends on the job seed alone.
SPLIT_SALT = 7919


def synthetic_arrays(s: SyntheticData, *, n: int, seed: int) -> tuple[Array, Array]:
    """X (n x d) and y (n), float64, drawn as the tutorial does with the spec's generator."""
    coefficients = s.true_coefficients()
    if s.generator == "torch":
        return _torch_arrays(s, coefficients, n=n, seed=seed)
    rs = np.random.RandomState(seed)
    columns = [rs.normal(0, 1, size=(n, 1)) for _ in coefficients]
    noise = rs.normal(0, 1, size=(n, 1)) * s.noise_std
    y = coefficients[0] * columns[0]
    for coefficient, column in zip(coefficients[1:], columns[1:], strict=True):
        y = y + coefficient * column
    y = y + s.intercept + noise
    return np.hstack(columns).astype(np.float64), y.reshape(n).astype(np.float64)


def _torch_arrays(
    s: SyntheticData, coefficients: list[float], *, n: int, seed: int
) -> tuple[Array, Array]:
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.normal(0, 1, (n, len(coefficients)), generator=g)
    noise = torch.normal(0, 1, (n, 1), generator=g) * s.noise_std
    w = torch.tensor(coefficients, dtype=torch.float32).reshape(-1, 1)
    y = x @ w + s.intercept + noise
    return (
        x.to(torch.float64).numpy(),
        y.reshape(n).to(torch.float64).numpy(),
    )


def split_rows(n: int, fraction: float, *, seed: int) -> tuple[Indices, Indices]:
    """Train and test row indices for a held-out fraction, each in ascending order."""
    held = held_out_rows(n, fraction)
    order = np.random.default_rng([seed, SPLIT_SALT, 0]).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


def build_train_data(spec: JobSpec, *, table: Table | None = None) -> TrainData:
    """The arrays a spec trains and tests on; a file's or dataset's table is given by the caller."""
    test = spec.data.test
    s = spec.data.synthetic
    if s is not None:
        x, y = synthetic_arrays(s, n=s.n_samples, seed=s.seed)
        truth = np.asarray(s.true_coefficients(), dtype=np.float64)
        if test is not None and test.n_samples is not None:
            # The seed field stops below 2**32, which RandomState and torch both accept.
            test_seed = test.seed if test.seed is not None else (s.seed + 1) % 2**32
            x_test, y_test = synthetic_arrays(s, n=test.n_samples, seed=test_seed)
            return TrainData(x, y, x_test, y_test, true_weights=truth, true_bias=s.intercept)
        return _with_split(spec, x, y, truth=truth, true_bias=s.intercept)
    source = "data.path" if spec.data.path is not None else "data.dataset"
    if table is None:
        raise DataError(f"{source}: the data was not loaded")
    table = _select(spec, table, source)
    if isinstance(spec.model.init, ExplicitInit) and len(spec.model.init.weights) != len(
        table.columns
    ):
        raise DataError(
            f"model.init.weights: expected {len(table.columns)} values (the data's feature "
            f"columns), got {len(spec.model.init.weights)}"
        )
    data = _with_split(spec, table.x, table.y, truth=None, true_bias=None)
    if spec.batch_size is not None and spec.batch_size > data.x.shape[0]:
        raise DataError(
            f"batch_size: {spec.batch_size} is more than the {data.x.shape[0]} training rows"
        )
    return data


def _select(spec: JobSpec, table: Table, source: str) -> Table:
    """The spec's target and features out of a loaded table."""
    target = spec.data.target
    if target is not None and target != table.target:
        raise DataError(f"data.target: {source}'s target is {table.target!r}, not {target!r}")
    features = spec.data.features
    if features is None or features == table.columns:
        return table
    unknown = [f for f in features if f not in table.columns]
    if unknown:
        raise DataError(
            f"data.features: no column {unknown[0]!r} in {source}; "
            f"columns: {', '.join(table.columns)}"
        )
    picks = [table.columns.index(f) for f in features]
    return Table(list(features), table.target, np.ascontiguousarray(table.x[:, picks]), table.y)


def _with_split(
    spec: JobSpec, x: Array, y: Array, *, truth: Array | None, true_bias: float | None
) -> TrainData:
    test = spec.data.test
    if test is None or test.fraction is None:
        return TrainData(x, y, true_weights=truth, true_bias=true_bias)
    train, held = split_rows(len(y), test.fraction, seed=spec.seed)
    return TrainData(x[train], y[train], x[held], y[held], true_weights=truth, true_bias=true_bias)


def load_spec_table(
    spec: JobSpec, settings: Settings, *, spec_dir: Path | None = None
) -> Table | None:
    """The table a spec's ``data.path`` names (relative to ``spec_dir``); None for other data."""
    path = spec.data.path
    if path is None:
        return None
    target = spec.data.target
    if target is None:
        raise DataError("data.target: required with data.path")
    return read_table(
        safe_path(path, settings.resolved_data_dir(), base=spec_dir),
        target=target,
        features=spec.data.features,
        max_bytes=settings.max_dataset_bytes,
        max_rows=settings.max_rows,
        max_features=settings.max_features,
    )
