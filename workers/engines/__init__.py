"""Training: ``train`` picks an engine for a spec and runs the epoch loop over it.

Engines: ``loop`` (reference.py, the backends' own loops: torch SGD and numpy gradient descent)
and ``fused`` (fused.py, the same mathematics at the cost of reading the data); registry.py
chooses. The checkpoint and summary are typed in state.py, the epoch loop is epochs.py.
"""

from __future__ import annotations

import time

from service.errors import DataError, SpecError, StateError
from service.settings import Settings
from service.spec import ExplicitInit, JobSpec
from workers.engines.base import (
    Checkpoint,
    OnEpoch,
    Params,
    RunResult,
    ShouldStop,
    TrainData,
)
from workers.engines.epochs import Engine, run_epochs
from workers.engines.registry import choose
from workers.engines.state import RunState

__all__ = ["Params", "cuda_available", "make_engine", "train"]

#: Chunk sizes when the caller gives none: the recorder's default cadence.
DEFAULT_CHUNK_EPOCHS: int = Settings.model_fields["record_every_epochs"].default
DEFAULT_CHUNK_SECONDS: float = Settings.model_fields["record_every_seconds"].default


def cuda_available() -> bool:
    """Whether torch sees a CUDA device here."""
    import torch

    return bool(torch.cuda.is_available())


def _cuda_possible(spec: JobSpec) -> bool:
    # Only a spec that may run on cuda needs torch imported to know.
    return spec.device != "cpu" and cuda_available()


def make_engine(spec: JobSpec, data: TrainData) -> Engine:
    """The engine the registry chooses for ``spec``, prepared on ``data``."""
    choice = choose(spec, cuda=_cuda_possible(spec))
    if choice.engine == "fused" and choice.place == "device":
        from workers.engines.fused_torch import TorchFusedEngine

        return TorchFusedEngine(spec, data)
    if choice.engine == "fused":
        from workers.engines.fused import FusedEngine

        return FusedEngine(spec, data)
    from workers.engines.reference import LoopEngine

    return LoopEngine(spec, data)


def train(
    spec: JobSpec,
    data: TrainData,
    *,
    on_epoch: OnEpoch | None = None,
    should_stop: ShouldStop | None = None,
    resume: Checkpoint | None = None,
    chunk_epochs: int | None = None,
    chunk_seconds: float | None = None,
) -> RunResult:
    """Run ``spec`` on ``data``, from its start or from the checkpoint ``resume``.

    After each epoch ``on_epoch(record, snapshot)`` is called, then ``should_stop()`` (unless the
    run has just finished its last epoch); True from it ends the run as ``cancelled``. The engine
    advances ``chunk_epochs`` at a time (fewer when that would take over ``chunk_seconds``).
    """
    _check_data(spec, data)
    state = None
    if resume is not None:
        state = RunState.from_json(
            resume, n_features=data.n_features, fit_intercept=spec.model.fit_intercept
        )
        # Another seed would reshuffle differently, so the run could not continue exactly.
        if state.seed != spec.seed:
            raise StateError(f"resume: checkpoint seed {state.seed} is not the spec's {spec.seed}")
    began = time.perf_counter()
    engine = make_engine(spec, data)
    setup = time.perf_counter() - began
    listening = on_epoch is not None or should_stop is not None
    return run_epochs(
        spec,
        data,
        engine,
        on_epoch=on_epoch,
        should_stop=should_stop,
        resume=state,
        # Nobody sees the epochs until the end: one chunk does them all.
        chunk_epochs=(chunk_epochs or DEFAULT_CHUNK_EPOCHS) if listening else spec.epochs,
        chunk_seconds=chunk_seconds or DEFAULT_CHUNK_SECONDS,
        setup_seconds=setup,
    )


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
