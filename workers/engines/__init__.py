"""Training: one epoch loop, shared by both backends, each of which owns only its math.

A checkpoint (the dict ``snapshot()`` returns) holds ``backend``, ``epoch`` (epochs completed),
``weights``, ``bias``, ``momentum`` (``{"weights", "bias"}`` SGD buffers, or None),
``shuffle`` (``{"seed", "next_epoch"}``), ``initial_weights``, ``initial_bias``, ``best_loss``
and ``train_seconds``; every number is a Python float, so JSON carries it exactly and a resumed
run continues bit for bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from service.errors import DataError, SpecError, StateError
from service.spec import ExplicitInit, JobSpec
from workers.engines.base import (
    Checkpoint,
    EpochRecord,
    OnEpoch,
    Params,
    RunResult,
    ShouldStop,
    Status,
    TrainData,
    batch_slices,
    epoch_order,
    summarize,
)

__all__ = ["Model", "Params", "cuda_available", "train"]


class Model(Protocol):
    """One backend's parameters and optimizer, stepped an epoch at a time by ``train``."""

    @property
    def device(self) -> str: ...

    def run_epoch(self, order: npt.NDArray[np.int64] | None, batches: Sequence[slice]) -> float:
        """Step through the batches of rows in ``order``; the sum of their pre-step SSEs."""
        ...

    def rewind(self) -> None:
        """Put the parameters back where the last ``run_epoch`` found them."""
        ...

    def test_loss(self) -> float:
        """The loss on the test rows at the current parameters, with the spec's reduction."""
        ...

    def parameters(self) -> Params: ...

    def momentum_buffers(self) -> Params | None: ...

    def restore(self, params: Params, momentum: Params | None) -> None: ...


def cuda_available() -> bool:
    """Whether torch sees a CUDA device here."""
    import torch

    return bool(torch.cuda.is_available())


def train(
    spec: JobSpec,
    data: TrainData,
    *,
    on_epoch: OnEpoch | None = None,
    should_stop: ShouldStop | None = None,
    resume: Checkpoint | None = None,
) -> RunResult:
    """Run ``spec`` on ``data``, from its start or from the checkpoint ``resume``.

    After each epoch ``on_epoch(record, snapshot)`` is called, then ``should_stop()`` (unless the
    run has just finished its last epoch); True from it ends the run as ``cancelled``.
    """
    _check_data(spec, data)
    model: Model
    # Imported here so that importing this package never imports torch.
    if spec.backend == "torch":
        from workers.engines.torch_engine import TorchModel

        model = TorchModel(spec, data)
    else:
        from workers.engines.numpy_engine import NumpyModel

        model = NumpyModel(spec, data)
    progress = _Progress(spec, model, initial=model.parameters())
    if resume is not None:
        progress.restore(resume, data.n_features)
    return progress.run(data, on_epoch, should_stop)


@dataclass
class _Progress:
    """A run's place: the epoch loop, its counters, and the snapshots and summary of them."""

    spec: JobSpec
    model: Model
    initial: Params
    epoch: int = 0  # epochs completed
    best_loss: float | None = None
    train_seconds: float = 0.0

    def snapshot(self) -> Checkpoint:
        """The run's state after the current epoch, JSON-safe."""
        weights, bias = self.model.parameters()
        momentum = self.model.momentum_buffers()
        return {
            "backend": self.spec.backend,
            "epoch": self.epoch,
            "weights": weights.tolist(),
            "bias": bias,
            "momentum": None
            if momentum is None
            else {"weights": momentum[0].tolist(), "bias": momentum[1]},
            "shuffle": {"seed": self.spec.seed, "next_epoch": self.epoch + 1},
            "initial_weights": self.initial[0].tolist(),
            "initial_bias": self.initial[1],
            "best_loss": self.best_loss,
            "train_seconds": self.train_seconds,
        }

    def restore(self, checkpoint: Checkpoint, n_features: int) -> None:
        """Continue from ``checkpoint``: parameters, momentum buffers and counters."""
        try:
            fit_intercept = self.spec.model.fit_intercept
            params = _params(checkpoint["weights"], checkpoint["bias"], n_features, fit_intercept)
            raw = checkpoint["momentum"]
            momentum = (
                None
                if raw is None
                else _params(raw["weights"], raw["bias"], n_features, fit_intercept)
            )
            initial = _params(
                checkpoint["initial_weights"],
                checkpoint["initial_bias"],
                n_features,
                fit_intercept,
            )
            epoch = int(checkpoint["epoch"])
            seed = int(checkpoint["shuffle"]["seed"])
            best = checkpoint["best_loss"]
            seconds = float(checkpoint["train_seconds"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"resume: not a usable checkpoint ({exc!r})") from None
        if epoch < 0:
            raise StateError(f"resume: checkpoint epoch {epoch} is negative")
        # Another seed would reshuffle differently, so the run could not continue exactly.
        if seed != self.spec.seed:
            raise StateError(f"resume: checkpoint seed {seed} is not the spec's {self.spec.seed}")
        if momentum is not None and self.spec.optimizer.momentum == 0:
            raise StateError("resume: checkpoint has momentum buffers but the spec has none")
        self.model.restore(params, momentum)
        self.initial = initial
        self.epoch = epoch
        self.best_loss = None if best is None else float(best)
        self.train_seconds = seconds

    def run(
        self, data: TrainData, on_epoch: OnEpoch | None, should_stop: ShouldStop | None
    ) -> RunResult:
        """Train the remaining epochs and summarize."""
        spec, model = self.spec, self.model
        n = len(data.y)
        batches = list(batch_slices(n, spec.batch_size))
        # One batch sums over every row in any order: reshuffling it would only cost a copy.
        reshuffle = spec.shuffle and len(batches) > 1
        has_test = data.x_test is not None and data.y_test is not None
        history: list[EpochRecord] = []
        status: Status = "succeeded"
        diverged_at: int | None = None
        for epoch in range(self.epoch + 1, spec.epochs + 1):
            began = time.perf_counter()
            order = epoch_order(n, seed=spec.seed, epoch=epoch, shuffle=True) if reshuffle else None
            train_loss = model.run_epoch(order, batches)
            if spec.loss.reduction == "mean":
                train_loss /= n
            test_loss = None
            if has_test and (epoch % spec.eval_every == 0 or epoch == spec.epochs):
                test_loss = model.test_loss()
            if not math.isfinite(train_loss) or (
                test_loss is not None and not math.isfinite(test_loss)
            ):
                model.rewind()
                status, diverged_at = "diverged", epoch
                break
            seconds = time.perf_counter() - began
            self.epoch = epoch
            self.train_seconds += seconds
            self.best_loss = (
                train_loss if self.best_loss is None else min(self.best_loss, train_loss)
            )
            record = EpochRecord(epoch, train_loss, test_loss, seconds)
            history.append(record)
            if on_epoch is not None:
                on_epoch(record, self.snapshot)
            # A run that has done all its epochs has succeeded, whatever arrives now.
            if should_stop is not None and epoch < spec.epochs and should_stop():
                status = "cancelled"
                break
        return RunResult(status, history, self.summary(data, status, history, diverged_at))

    def summary(
        self, data: TrainData, status: Status, history: list[EpochRecord], diverged_at: int | None
    ) -> dict[str, Any]:
        """``summarize`` of the final parameters plus the run's own facts, JSON-safe."""
        spec = self.spec
        weights, bias = self.model.parameters()
        # Parameters kept from just before a divergence may be huge; inf and nan become None.
        with np.errstate(all="ignore"):
            summary = summarize(
                data,
                weights=weights,
                bias=bias,
                reduction=spec.loss.reduction,
                fit_intercept=spec.model.fit_intercept,
            )
        summary.update(
            status=status,
            epochs_done=self.epoch,
            train_loss=history[-1].train_loss if history else None,
            best_loss=self.best_loss,
            initial_weights=self.initial[0].tolist(),
            initial_bias=self.initial[1],
            train_seconds=self.train_seconds,
            device=self.model.device,
            backend=spec.backend,
            dtype=spec.dtype,
        )
        if diverged_at is not None:
            summary["diverged_at"] = diverged_at
        return {key: _finite(value) for key, value in summary.items()}


def _params(weights: Any, bias: Any, n_features: int, fit_intercept: bool) -> Params:
    array = np.asarray(weights, dtype=np.float64)
    if array.shape != (n_features,):
        raise ValueError(f"{len(array.reshape(-1))} weights for {n_features} features")
    if fit_intercept != (bias is not None):
        raise ValueError("a bias is required exactly when fit_intercept is true")
    return array, None if bias is None else float(bias)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _check_data(spec: JobSpec, data: TrainData) -> None:
    if data.x.ndim != 2 or data.y.shape != (data.x.shape[0],) or data.x.shape[0] == 0:
        raise DataError(
            f"training data: need x of shape (n, d) with n > 0 and y of shape (n,), "
            f"got {data.x.shape} and {data.y.shape}"
        )
    if (data.x_test is None) != (data.y_test is None):
        raise DataError("test data: give both x_test and y_test, or neither")
    if data.x_test is not None and data.y_test is not None:
        rows = data.x_test.shape[0]
        if (
            rows == 0
            or data.x_test.shape != (rows, data.n_features)
            or data.y_test.shape != (rows,)
        ):
            raise DataError(
                f"test data: need x_test of shape (m, {data.n_features}) and y_test of shape "
                f"(m,) with m > 0, got {data.x_test.shape} and {data.y_test.shape}"
            )
    init = spec.model.init
    if isinstance(init, ExplicitInit) and len(init.weights) != data.n_features:
        raise SpecError(
            f"model.init.weights: expected {data.n_features} values (the data's features), "
            f"got {len(init.weights)}"
        )
