"""The ``loop`` engine: the backends' reference loops, one batch at a time, as the tutorial runs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from service.errors import StateError
from service.spec import JobSpec
from workers.engines.base import (
    Params,
    Status,
    TrainData,
    batch_slices,
    epoch_order,
    summarize,
)
from workers.engines.epochs import Chunk, EpochState
from workers.engines.state import RunState, Summary


class Model(Protocol):
    """One backend's parameters and optimizer, stepped an epoch at a time."""

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


class LoopEngine:
    """Steps a backend's model epoch by epoch; a chunk is a run of those epochs."""

    name = "loop"

    def __init__(self, spec: JobSpec, data: TrainData) -> None:
        model: Model
        # Imported here so that importing this package never imports torch.
        if spec.backend == "torch":
            from workers.engines.torch_engine import TorchModel

            model = TorchModel(spec, data)
        else:
            from workers.engines.numpy_engine import NumpyModel

            model = NumpyModel(spec, data)
        self.spec, self.data, self.model = spec, data, model
        self.device = model.device
        n = len(data.y)
        self.batches = list(batch_slices(n, spec.batch_size))
        # One batch sums over every row in any order: reshuffling it would only cost a copy.
        self.reshuffle = spec.shuffle and len(self.batches) > 1
        self.states: list[EpochState] = [self._now()]
        self._start = self.model.parameters()

    def _now(self) -> EpochState:
        return EpochState(self.model.parameters(), self.model.momentum_buffers())

    def initial(self) -> Params:
        return self._start

    def restore(self, state: RunState) -> None:
        if state.momentum is not None and self.spec.optimizer.momentum == 0:
            raise StateError("resume: checkpoint has momentum buffers but the spec has none")
        self.model.restore(state.params, state.momentum)
        self.states = [self._now()]

    def advance(self, start: int, count: int, evaluate: npt.NDArray[np.bool_]) -> Chunk:
        spec, n = self.spec, len(self.data.y)
        self.states = [self._now()]
        train: list[float] = []
        test: list[float] = []
        diverged = False
        for index in range(count):
            epoch = start + index + 1
            order = epoch_order(n, seed=spec.seed, epoch=epoch, shuffle=True)
            loss = self.model.run_epoch(order if self.reshuffle else None, self.batches)
            if spec.loss.reduction == "mean":
                loss /= n
            test_loss = self.model.test_loss() if evaluate[index] else math.nan
            if not math.isfinite(loss) or (evaluate[index] and not math.isfinite(test_loss)):
                self.model.rewind()
                diverged = True
                break
            train.append(loss)
            test.append(test_loss)
            self.states.append(self._now())
        return Chunk(np.asarray(train), np.asarray(test), diverged)

    def state_after(self, index: int) -> EpochState:
        return self.states[index + 1]

    def keep(self, index: int) -> None:
        state = self.states[index + 1]
        self.model.restore(state.params, state.momentum)
        self.states = [state]

    def summary(self, status: Status) -> Summary:
        spec, (weights, bias) = self.spec, self.model.parameters()
        # Parameters kept from just before a divergence may be huge.
        with np.errstate(all="ignore"):
            facts = summarize(
                self.data,
                weights=weights,
                bias=bias,
                reduction=spec.loss.reduction,
                fit_intercept=spec.model.fit_intercept,
            )
        return Summary(
            status=status,
            **facts,
            epochs_done=0,
            train_loss=None,
            best_loss=None,
            initial_weights=[],
            initial_bias=None,
            train_seconds=0.0,
            device=self.device,
            backend=spec.backend,
            dtype=spec.dtype,
            engine=self.name,
        )
