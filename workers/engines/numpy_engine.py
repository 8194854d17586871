"""NumPy backend: the tutorial's gradient descent, stepped by torch.optim.SGD's update rule.

Parameters live over the design matrix (a column of ones first when fitting an intercept).
``init: default`` means each backend's own default start; here it is the tutorial's zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from service.spec import ExplicitInit, JobSpec
from workers.engines.base import Array, Params, TrainData, design

Vector = npt.NDArray[np.floating[Any]]


class NumpyModel:
    """Gradient descent over the design matrix, all arithmetic in the spec's dtype."""

    device = "cpu"

    def __init__(self, spec: JobSpec, data: TrainData) -> None:
        self._dtype = np.dtype(spec.dtype)
        scalar = self._dtype.type
        self._intercept = spec.model.fit_intercept
        self._x: Vector = design(data.x, self._intercept).astype(self._dtype)
        self._y: Vector = data.y.astype(self._dtype)
        self._x_test: Vector | None = None
        self._y_test: Vector | None = None
        if data.x_test is not None and data.y_test is not None:
            self._x_test = design(data.x_test, self._intercept).astype(self._dtype)
            self._y_test = data.y_test.astype(self._dtype)
        self._mean = spec.loss.reduction == "mean"
        options = spec.optimizer
        # Scalars in the array dtype, so float32 runs never widen to float64 on the way.
        self._lr = scalar(options.lr)
        self._momentum = scalar(options.momentum)
        self._kept = scalar(1 - options.dampening)
        self._decay = scalar(options.weight_decay)
        self._nesterov = options.nesterov
        self._two = scalar(2)
        init = spec.model.init
        if isinstance(init, ExplicitInit):
            self._p = self._vector(np.asarray(init.weights, dtype=np.float64), init.bias)
        else:
            self._p = np.zeros(self._x.shape[1], dtype=self._dtype)
        self._buffer: Vector | None = None
        self._start = self._p

    def _vector(self, weights: Array, bias: float | None) -> Vector:
        head = [bias] if self._intercept and bias is not None else []
        return np.concatenate([np.asarray(head, dtype=np.float64), weights]).astype(self._dtype)

    def _split(self, vector: Vector) -> Params:
        values = vector.astype(np.float64)
        if self._intercept:
            return values[1:], float(values[0])
        return values, None

    def run_epoch(self, order: npt.NDArray[np.int64] | None, batches: Sequence[slice]) -> float:
        """Step through the batches of rows in ``order``; the sum of their pre-step SSEs."""
        x, y = (self._x, self._y) if order is None else (self._x[order], self._y[order])
        self._start = self._p
        total = 0.0
        # Overflow is how a run diverges; the loop sees the inf and stops.
        with np.errstate(over="ignore", invalid="ignore"):
            for batch in batches:
                xb = x[batch]
                residual = xb @ self._p - y[batch]
                total += float(residual @ residual)
                scale = self._two / self._dtype.type(len(residual)) if self._mean else self._two
                self._step(xb.T @ (scale * residual))
        return total

    def _step(self, grad: Vector) -> None:
        # torch.optim.SGD's update, including its decay of the bias.
        if self._decay:
            grad = grad + self._decay * self._p
        if self._momentum:
            if self._buffer is None:
                self._buffer = grad.copy()
            else:
                self._buffer = self._momentum * self._buffer + self._kept * grad
            grad = grad + self._momentum * self._buffer if self._nesterov else self._buffer
        self._p = self._p - self._lr * grad

    def rewind(self) -> None:
        """Put the parameters back where the last ``run_epoch`` found them."""
        self._p = self._start

    def test_loss(self) -> float:
        """The loss on the test rows at the current parameters."""
        assert self._x_test is not None and self._y_test is not None
        with np.errstate(over="ignore", invalid="ignore"):
            residual = self._x_test @ self._p - self._y_test
            sse = float(residual @ residual)
        return sse / len(residual) if self._mean else sse

    def parameters(self) -> Params:
        """Weights and bias as float64."""
        return self._split(self._p)

    def momentum_buffers(self) -> Params | None:
        """SGD's momentum buffers (None before the first step or without momentum)."""
        return None if self._buffer is None else self._split(self._buffer)

    def restore(self, params: Params, momentum: Params | None) -> None:
        """Set parameters and momentum buffers exactly as a checkpoint holds them."""
        self._p = self._vector(*params)
        self._buffer = None if momentum is None else self._vector(*momentum)
