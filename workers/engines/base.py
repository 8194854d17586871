"""What every engine shares: its inputs, its outputs, the epoch order and the optimum.

An epoch's loss is defined once, here, for both backends: the sum over the epoch's batches of
each batch's summed squared error, computed before that batch's step, divided by the number of
training rows when the reduction is ``mean``. For full batch with ``sum`` this is exactly the
loss the tutorial prints each epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]
#: A JSON-safe snapshot from which a run resumes exactly (see ``Checkpoint`` keys in engines).
Checkpoint = dict[str, Any]
Status = Literal["succeeded", "diverged", "cancelled"]
#: Weights and bias (None without an intercept), as float64.
Params = tuple[Array, float | None]


@dataclass(frozen=True)
class TrainData:
    """Prepared arrays (float64; engines cast to the spec's dtype)."""

    x: Array
    y: Array
    x_test: Array | None = None
    y_test: Array | None = None
    true_weights: Array | None = None
    true_bias: float | None = None

    @property
    def n_features(self) -> int:
        return int(self.x.shape[1])


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based
    train_loss: float
    test_loss: float | None
    seconds: float


#: Called after every epoch with its record and a function that snapshots the run's state;
#: the snapshot is taken only if the callback calls it (a checkpoint costs nothing otherwise).
OnEpoch = Callable[[EpochRecord, Callable[[], Checkpoint]], None]
ShouldStop = Callable[[], bool]


@dataclass
class RunResult:
    status: Status
    history: list[EpochRecord]  # the epochs run by this call (after the resume point, if any)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def losses(self) -> list[float]:
        return [r.train_loss for r in self.history]


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool) -> npt.NDArray[np.int64]:
    """Row order for one epoch; a function of (seed, epoch) alone, so a resumed run reshuffles
    exactly as an uninterrupted one would and both backends see the same batches."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64, copy=False)


def batch_slices(n: int, batch_size: int | None) -> Iterator[slice]:
    """Consecutive batches; the last one may be short (no rows dropped)."""
    size = n if batch_size is None else min(batch_size, n)
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def design(x: Array, fit_intercept: bool) -> Array:
    return np.hstack([np.ones((x.shape[0], 1)), x]) if fit_intercept else x


def loss_of(x: Array, y: Array, weights: Array, bias: float | None, reduction: str) -> float:
    """The loss of given parameters on a dataset, in float64."""
    residual = x @ weights + (bias or 0.0) - y
    sse = float(residual @ residual)
    return sse / len(y) if reduction == "mean" else sse


def optimum(x: Array, y: Array, fit_intercept: bool) -> tuple[Array, float | None]:
    """The least-squares parameters (numpy.linalg.lstsq)."""
    solution = np.linalg.lstsq(design(x, fit_intercept), y, rcond=None)[0].astype(np.float64)
    if fit_intercept:
        return solution[1:], float(solution[0])
    return solution, None


def r_squared(x: Array, y: Array, weights: Array, bias: float | None) -> float | None:
    total = float(((y - y.mean()) ** 2).sum())
    if total == 0.0:
        return None
    residual = x @ weights + (bias or 0.0) - y
    return 1.0 - float(residual @ residual) / total


def summarize(
    data: TrainData,
    *,
    weights: Array,
    bias: float | None,
    reduction: str,
    fit_intercept: bool,
) -> dict[str, Any]:
    """Everything about final parameters that needs only math: losses, R², optimum, truth."""
    final_loss = loss_of(data.x, data.y, weights, bias, reduction)
    best_w, best_b = optimum(data.x, data.y, fit_intercept)
    optimum_loss = loss_of(data.x, data.y, best_w, best_b, reduction)
    summary: dict[str, Any] = {
        "weights": weights.tolist(),
        "bias": bias,
        "final_loss": final_loss,
        "optimum_loss": optimum_loss,
        # lstsq is the minimum; a negative gap is rounding at convergence.
        "optimum_gap": max(final_loss - optimum_loss, 0.0),
        "optimum_weights": best_w.tolist(),
        "optimum_bias": best_b,
        "r2": r_squared(data.x, data.y, weights, bias),
        "test_loss": None,
        "test_r2": None,
        "coef_error": None,
    }
    if data.x_test is not None and data.y_test is not None:
        summary["test_loss"] = loss_of(data.x_test, data.y_test, weights, bias, reduction)
        summary["test_r2"] = r_squared(data.x_test, data.y_test, weights, bias)
    if data.true_weights is not None:
        errors = list(np.abs(weights - data.true_weights))
        if fit_intercept and data.true_bias is not None and bias is not None:
            errors.append(abs(bias - data.true_bias))
        summary["coef_error"] = float(max(errors))
    return summary
