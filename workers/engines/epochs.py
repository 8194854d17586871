"""The epoch loop: advances any engine a chunk of epochs at a time and reports every epoch."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from service.spec import JobSpec
from workers.engines.base import (
    Array,
    Checkpoint,
    EpochRecord,
    OnEpoch,
    Params,
    RunResult,
    ShouldStop,
    Status,
    TrainData,
)
from workers.engines.state import Anchor, RunState, Summary


@dataclass
class Chunk:
    """What ``advance`` did: one entry per epoch that stayed finite, in order."""

    train_losses: Array  # with the spec's reduction
    test_losses: Array  # nan where the epoch was not evaluated
    diverged: bool  # the epoch after the last one here went non-finite


@dataclass(frozen=True)
class EpochState:
    """Parameters after one epoch, and what the engine needs to resume from them exactly."""

    params: Params
    momentum: Params | None
    anchor: Anchor | None = None


class Engine(Protocol):
    """One way of training a spec: it advances by chunks and keeps each epoch's state."""

    name: str
    device: str

    def initial(self) -> Params:
        """The parameters the run starts from."""
        ...

    def restore(self, state: RunState) -> None:
        """Continue from a checkpoint's state."""
        ...

    def advance(self, start: int, count: int, evaluate: npt.NDArray[np.bool_]) -> Chunk:
        """Run epochs ``start + 1 … start + count``; ``evaluate[i]``: test loss after epoch i."""
        ...

    def state_after(self, index: int) -> EpochState:
        """The state after the ``index``-th epoch of the last chunk (-1: before it)."""
        ...

    def keep(self, index: int) -> None:
        """Make the state after the ``index``-th epoch of the last chunk the current one."""
        ...

    def summary(self, status: Status) -> Summary:
        """The math of the current parameters (losses, R², optimum), the run's facts left blank."""
        ...


@dataclass
class Progress:
    """A run's counters, and the snapshots built from them and an engine's state."""

    spec: JobSpec
    engine: Engine
    initial: Params
    epoch: int = 0
    best_loss: float | None = None
    train_seconds: float = 0.0
    history: list[EpochRecord] = field(default_factory=list)

    def snapshot(self, state: EpochState) -> RunState:
        return RunState(
            backend=self.spec.backend,
            epoch=self.epoch,
            params=state.params,
            momentum=state.momentum,
            seed=self.spec.seed,
            initial=self.initial,
            best_loss=self.best_loss,
            train_seconds=self.train_seconds,
            anchor=state.anchor,
        )


class EpochRun:
    """One run's epoch loop, advanced a chunk at a time by its caller (alone or in a pack)."""

    def __init__(
        self,
        spec: JobSpec,
        data: TrainData,
        engine: Engine,
        *,
        on_epoch: OnEpoch | None,
        should_stop: ShouldStop | None,
        resume: RunState | None,
        setup_seconds: float = 0.0,
    ) -> None:
        self.spec, self.engine = spec, engine
        self.on_epoch, self.should_stop = on_epoch, should_stop
        progress = Progress(spec, engine, initial=engine.initial())
        if resume is not None:
            engine.restore(resume)
            progress.initial = resume.initial
            progress.epoch = resume.epoch
            progress.best_loss = resume.best_loss
            progress.train_seconds = resume.train_seconds
        progress.train_seconds += setup_seconds
        self.progress = progress
        self.has_test = data.x_test is not None and data.y_test is not None
        self.status: Status = "succeeded"
        self.diverged_at: int | None = None

    @property
    def running(self) -> bool:
        return self.progress.epoch < self.spec.epochs and self.status == "succeeded"

    @property
    def remaining(self) -> int:
        return self.spec.epochs - self.progress.epoch

    def advance(self, count: int, *, shared_seconds: float = 0.0) -> float:
        """Run up to ``count`` more epochs and report each; returns the seconds they took.

        ``shared_seconds``: this run's share of work done for it elsewhere (a pack's passes).
        """
        spec, progress, engine = self.spec, self.progress, self.engine
        count = min(count, self.remaining)
        epochs = np.arange(progress.epoch + 1, progress.epoch + count + 1)
        evaluate = np.zeros(count, dtype=bool)
        if self.has_test:
            evaluate = (epochs % spec.eval_every == 0) | (epochs == spec.epochs)
        began = time.perf_counter()
        chunk = engine.advance(progress.epoch, count, evaluate)
        done = len(chunk.train_losses)
        took = time.perf_counter() - began
        per_epoch = (took + shared_seconds) / max(done, 1)
        if chunk.diverged:
            self.status, self.diverged_at = "diverged", progress.epoch + done + 1
        losses, tests = chunk.train_losses.tolist(), chunk.test_losses.tolist()
        for index in range(done):
            progress.epoch += 1
            progress.train_seconds += per_epoch
            loss, test = losses[index], tests[index]
            best = progress.best_loss
            progress.best_loss = loss if best is None or loss < best else best
            record = EpochRecord(progress.epoch, loss, None if test != test else test, per_epoch)
            progress.history.append(record)
            if self.on_epoch is not None:
                self.on_epoch(record, _snapshotter(progress, engine, index))
            # A run that has done all its epochs has succeeded, whatever arrives now.
            if self.should_stop is not None and progress.epoch < spec.epochs and self.should_stop():
                engine.keep(index)
                # A divergence later in the chunk is past the epoch the run stops at.
                self.status, self.diverged_at = "cancelled", None
                break
        return took

    def result(self) -> RunResult:
        """The run's status, the epochs run by this call and its summary."""
        progress = self.progress
        summary = self.engine.summary(self.status)
        summary.epochs_done = progress.epoch
        summary.train_loss = progress.history[-1].train_loss if progress.history else None
        summary.best_loss = progress.best_loss
        summary.initial_weights = progress.initial[0].tolist()
        summary.initial_bias = progress.initial[1]
        summary.train_seconds = progress.train_seconds
        summary.diverged_at = self.diverged_at
        return RunResult(self.status, progress.history, summary.to_json())


def chunk_size(per_epoch: float | None, *, chunk_epochs: int, chunk_seconds: float) -> int:
    """Epochs in the next chunk: one first, to time it; then as many as fit in the seconds."""
    # Slow epochs make short chunks, so that a cancel or a lost lease is still seen within
    # T seconds.
    if per_epoch is None:
        return 1
    if per_epoch > 0:
        return max(1, min(chunk_epochs, int(chunk_seconds / per_epoch)))
    return chunk_epochs


def run_epochs(
    spec: JobSpec,
    data: TrainData,
    engine: Engine,
    *,
    on_epoch: OnEpoch | None,
    should_stop: ShouldStop | None,
    resume: RunState | None,
    chunk_epochs: int,
    chunk_seconds: float,
    setup_seconds: float = 0.0,
) -> RunResult:
    """Train the remaining epochs chunk by chunk, calling back after every epoch.

    ``setup_seconds`` (the engine's preparation: statistics passes, compilation) counts as
    training time.
    """
    run = EpochRun(
        spec,
        data,
        engine,
        on_epoch=on_epoch,
        should_stop=should_stop,
        resume=resume,
        setup_seconds=setup_seconds,
    )
    per_epoch: float | None = None
    while run.running:
        before = run.progress.epoch
        count = chunk_size(per_epoch, chunk_epochs=chunk_epochs, chunk_seconds=chunk_seconds)
        took = run.advance(count)
        per_epoch = took / max(run.progress.epoch - before, 1)
    return run.result()


def _snapshotter(progress: Progress, engine: Engine, index: int) -> Callable[[], Checkpoint]:
    # Counters are read when the snapshot is taken: during this epoch's callback.
    def snapshot() -> Checkpoint:
        return progress.snapshot(engine.state_after(index)).to_json()

    return snapshot
