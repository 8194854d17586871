"""A run's typed state and summary, defined once: what a checkpoint holds and a result reports.

A checkpoint (``RunState.to_json()``) holds ``backend``, ``epoch`` (epochs completed),
``weights``, ``bias``, ``momentum`` (``{"weights", "bias"}`` SGD buffers, or None),
``shuffle`` (``{"seed", "next_epoch"}``), ``initial_weights``, ``initial_bias``, ``best_loss``,
``train_seconds`` and, from the fused full-batch engine, ``anchor`` (the state its current
block of epochs is computed from, so that a resume recomputes the same numbers). Every number
is a Python float, so JSON carries it exactly and a resumed run continues bit for bit. A pack
of jobs is a list of these states; each member's slice is the checkpoint it would resume from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from service.errors import StateError
from workers.engines.base import Array, Checkpoint, Params, Status

EngineName = str  # "loop" | "fused"


def _vector(raw: Any, n_features: int, what: str) -> Array:
    array = np.asarray(raw, dtype=np.float64)
    if array.shape != (n_features,):
        raise ValueError(f"{what}: {len(array.reshape(-1))} weights for {n_features} features")
    return array


def _bias(raw: Any, fit_intercept: bool, what: str) -> float | None:
    if fit_intercept != (raw is not None):
        raise ValueError(f"{what}: a bias is required exactly when fit_intercept is true")
    return None if raw is None else float(raw)


def params_json(params: Params) -> dict[str, Any]:
    """Weights and bias as JSON."""
    return {"weights": params[0].tolist(), "bias": params[1]}


def params_from_json(
    raw: Any, *, n_features: int, fit_intercept: bool, what: str = "parameters"
) -> Params:
    """Weights and bias from JSON, checked against the data's shape."""
    return (
        _vector(raw["weights"], n_features, what),
        _bias(raw["bias"], fit_intercept, what),
    )


@dataclass(frozen=True)
class Anchor:
    """A state some later epochs are computed from as powers of one map (fused full batch)."""

    epoch: int
    params: Params
    momentum: Params | None

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            **params_json(self.params),
            "momentum": None if self.momentum is None else params_json(self.momentum),
        }

    @classmethod
    def from_json(cls, raw: Any, *, n_features: int, fit_intercept: bool) -> Anchor:
        momentum = raw["momentum"]
        return cls(
            epoch=int(raw["epoch"]),
            params=params_from_json(
                raw, n_features=n_features, fit_intercept=fit_intercept, what="anchor"
            ),
            momentum=None
            if momentum is None
            else params_from_json(
                momentum, n_features=n_features, fit_intercept=fit_intercept, what="anchor"
            ),
        )


@dataclass(frozen=True)
class RunState:
    """Everything a run needs to continue exactly: parameters, buffers, epoch, counters."""

    backend: str
    epoch: int  # epochs completed
    params: Params
    momentum: Params | None
    seed: int
    initial: Params
    best_loss: float | None
    train_seconds: float
    anchor: Anchor | None = None

    def to_json(self) -> Checkpoint:
        """The JSON-safe checkpoint."""
        checkpoint: Checkpoint = {
            "backend": self.backend,
            "epoch": self.epoch,
            **params_json(self.params),
            "momentum": None if self.momentum is None else params_json(self.momentum),
            "shuffle": {"seed": self.seed, "next_epoch": self.epoch + 1},
            "initial_weights": self.initial[0].tolist(),
            "initial_bias": self.initial[1],
            "best_loss": self.best_loss,
            "train_seconds": self.train_seconds,
        }
        if self.anchor is not None:
            checkpoint["anchor"] = self.anchor.to_json()
        return checkpoint

    @classmethod
    def from_json(cls, raw: Checkpoint, *, n_features: int, fit_intercept: bool) -> RunState:
        """A checkpoint (this schema, or the earlier one without ``anchor``) checked for use."""

        def params(value: Any) -> Params:
            return params_from_json(value, n_features=n_features, fit_intercept=fit_intercept)

        try:
            momentum = raw["momentum"]
            anchor = raw.get("anchor")
            best = raw["best_loss"]
            state = cls(
                backend=str(raw["backend"]),
                epoch=int(raw["epoch"]),
                params=params(raw),
                momentum=None if momentum is None else params(momentum),
                seed=int(raw["shuffle"]["seed"]),
                initial=params({"weights": raw["initial_weights"], "bias": raw["initial_bias"]}),
                best_loss=None if best is None else float(best),
                train_seconds=float(raw["train_seconds"]),
                anchor=None
                if anchor is None
                else Anchor.from_json(anchor, n_features=n_features, fit_intercept=fit_intercept),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StateError(f"resume: not a usable checkpoint ({exc!r})") from None
        if state.epoch < 0:
            raise StateError(f"resume: checkpoint epoch {state.epoch} is negative")
        if state.anchor is not None and not 0 <= state.anchor.epoch <= state.epoch:
            raise StateError("resume: checkpoint anchor is not at or before its epoch")
        return state


@dataclass(frozen=True)
class Optimum:
    """The least-squares fit of a training set: a property of the data, shared by its runs."""

    weights: Array
    bias: float | None
    rss: float  # the summed squared residual at the optimum
    rows: int

    def loss(self, reduction: str) -> float:
        return self.rss / self.rows if reduction == "mean" else self.rss


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


@dataclass
class Summary:
    """A run's result: final parameters, their losses, the optimum, and the run's own facts."""

    status: Status
    weights: list[float]
    bias: float | None
    final_loss: float | None
    optimum_loss: float | None
    optimum_gap: float | None
    optimum_weights: list[float]
    optimum_bias: float | None
    r2: float | None
    test_loss: float | None
    test_r2: float | None
    coef_error: float | None
    epochs_done: int
    train_loss: float | None
    best_loss: float | None
    initial_weights: list[float]
    initial_bias: float | None
    train_seconds: float
    device: str
    backend: str
    dtype: str
    engine: EngineName
    diverged_at: int | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        """JSON-safe: inf and nan (parameters kept from just before a divergence) become None."""
        out = {f.name: _finite(getattr(self, f.name)) for f in fields(self)}
        if self.diverged_at is None:
            del out["diverged_at"]
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Summary:
        names = {f.name for f in fields(cls)}
        # Summaries stored before engines were chosen all came from the loop.
        return cls(**{"engine": "loop", **{k: v for k, v in raw.items() if k in names}})
