"""Packed sweeps: many jobs on one dataset trained as one computation, each member exact.

Members share the data's statistics pass (and its optimum). Mini-batch members that also
share their batch order (batch size, shuffle, seed, and the epoch they are at) step together:
one pass over each epoch's permuted rows steps every member of the group, each member's
arithmetic in the order the solo kernel uses, so each member's numbers are its solo run's
bits. Full-batch members cost only their own epoch maps. Each member keeps its own epoch
loop (``EpochRun``): it is checkpointed, cancelled, diverges and finishes on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numba
import numpy as np

from service.errors import LrqError, StateError
from service.spec import JobSpec
from workers.engines.base import (
    Array,
    Checkpoint,
    OnEpoch,
    RunResult,
    ShouldStop,
    TrainData,
    epoch_order,
)
from workers.engines.epochs import EpochRun, chunk_size
from workers.engines.fused import (
    ANCHOR_EPOCHS,
    FitStatistics,
    FusedEngine,
    fit_statistics,
)
from workers.engines.registry import choose
from workers.engines.state import RunState

if TYPE_CHECKING:
    import torch


def packable(spec: JobSpec, *, cuda: bool = False) -> bool:
    """Whether ``spec`` runs on the fused engine (compiled kernels or a torch device), which
    packs; the reference loop does not."""
    try:
        choice = choose(spec, cuda=cuda)
    except LrqError:
        return False
    return choice.engine == "fused"


def pack_place(spec: JobSpec, *, cuda: bool) -> str:
    """Where a pack of ``spec``'s sweep trains: ``cpu`` (compiled kernels) or ``device``."""
    return choose(spec, cuda=cuda).place


def member_bytes(spec: JobSpec, n_features: int, chunk_epochs: int) -> int:
    """A member's own memory (its maps, powers and one chunk's trail), not the shared data."""
    size = 2 * (n_features + 1) + 1
    return 8 * (ANCHOR_EPOCHS * size * size + 4 * chunk_epochs * size)


@dataclass
class Member:
    """One job of a pack: its spec, where it resumes from, and its callbacks."""

    key: str
    spec: JobSpec
    resume: Checkpoint | None = None
    on_epoch: OnEpoch | None = None
    should_stop: ShouldStop | None = None


@numba.njit(cache=True)
def packed_minibatch_epoch(  # type: ignore[no-untyped-def]
    x,
    residual,
    order,
    intercept,
    batch_size,
    mean,
    shift,
    params,
    buffer,
    has_buffer,
    lr,
    momentum,
    kept,
    decay,
    nesterov,
    total,
):
    """kernels.minibatch_epoch for K members at once (columns of ``params``/``buffer``).

    Every member's operations are the solo kernel's, in its order; only the row reads are
    shared. ``total`` receives each member's summed squared error.
    """
    n, d = x.shape
    members = params.shape[1]
    lead = 1 if intercept else 0
    width = d + lead
    delta = np.empty((width, members))
    grad = np.empty((width, members))
    error = np.empty(members)
    sse = np.empty(members)
    shuffled = order.shape[0] == n
    for m in range(members):
        total[m] = 0.0
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        for k in range(width):
            for m in range(members):
                delta[k, m] = params[k, m] - shift[k]
                grad[k, m] = 0.0
        for m in range(members):
            sse[m] = 0.0
        for pos in range(start, stop):
            i = order[pos] if shuffled else pos
            if intercept:
                for m in range(members):
                    error[m] = delta[0, m]
            else:
                for m in range(members):
                    error[m] = 0.0
            for j in range(d):
                value = x[i, j]
                for m in range(members):
                    error[m] += value * delta[lead + j, m]
            target = residual[i]
            for m in range(members):
                e = error[m] - target
                error[m] = e
                sse[m] += e * e
            if intercept:
                for m in range(members):
                    grad[0, m] += error[m]
            for j in range(d):
                value = x[i, j]
                for m in range(members):
                    grad[lead + j, m] += error[m] * value
        for m in range(members):
            total[m] += sse[m]
        for k in range(width):
            for m in range(members):
                scale = 2.0 / (stop - start) if mean[m] else 2.0
                g = scale * grad[k, m]
                if decay[m] != 0.0:
                    g = g + decay[m] * params[k, m]
                if momentum[m] != 0.0:
                    if has_buffer[m]:
                        buffer[k, m] = momentum[m] * buffer[k, m] + kept[m] * g
                    else:
                        buffer[k, m] = g
                    g = g + momentum[m] * buffer[k, m] if nesterov[m] else buffer[k, m]
                params[k, m] = params[k, m] - lr[m] * g
        for m in range(members):
            if momentum[m] != 0.0:
                has_buffer[m] = True


class _EpochSource(Protocol):
    def result(self, engine: Any, epoch: int) -> tuple[float, Array, Array, bool]: ...


class GroupedEpochs:
    """A mini-batch member whose epochs its batch group computes, with the group's others:
    each epoch takes the group's result for it."""

    group: _EpochSource
    params: Array
    buffer: Array
    has_buffer: bool

    def _mini_epoch(self, epoch: int, batch_size: int) -> float:
        sse, params, buffer, has_buffer = self.group.result(self, epoch)
        self.params, self.buffer, self.has_buffer = params, buffer, has_buffer
        return sse


class _GroupedEngine(GroupedEpochs, FusedEngine):
    """A mini-batch member of a CPU batch group."""


@dataclass
class _BatchGroup:
    """Mini-batch members at the same epoch with the same batch order: one pass steps all."""

    engines: list[_GroupedEngine]
    results: dict[tuple[int, int], tuple[float, Array, Array, bool]] = field(default_factory=dict)

    def run(self, start: int, count: int) -> None:
        """Compute epochs ``start + 1 … start + count`` for every member."""
        first = self.engines[0]
        spec = first.spec
        batch_size = spec.batch_size or first.rows
        params = np.ascontiguousarray(np.stack([e.params for e in self.engines], axis=1))
        buffer = np.ascontiguousarray(np.stack([e.buffer for e in self.engines], axis=1))
        has_buffer = np.array([e.has_buffer for e in self.engines], dtype=np.bool_)

        def each(pick: Callable[[JobSpec], float | bool], dtype: Any) -> Any:
            return np.array([pick(e.spec) for e in self.engines], dtype=dtype)

        lr = each(lambda s: s.optimizer.lr, np.float64)
        momentum = each(lambda s: s.optimizer.momentum, np.float64)
        kept = each(lambda s: 1.0 - s.optimizer.dampening, np.float64)
        decay = each(lambda s: s.optimizer.weight_decay, np.float64)
        nesterov = each(lambda s: s.optimizer.nesterov, np.bool_)
        mean = each(lambda s: s.loss.reduction == "mean", np.bool_)
        total = np.empty(len(self.engines))
        self.results.clear()
        for epoch in range(start + 1, start + count + 1):
            order = (
                epoch_order(first.rows, seed=spec.seed, epoch=epoch, shuffle=True)
                if first.reshuffle
                else np.empty(0, dtype=np.int64)
            )
            packed_minibatch_epoch(
                first.x,
                first.stats.residual,
                order,
                first.intercept,
                batch_size,
                mean,
                first.stats.shift,
                params,
                buffer,
                has_buffer,
                lr,
                momentum,
                kept,
                decay,
                nesterov,
                total,
            )
            for lane, engine in enumerate(self.engines):
                self.results[(id(engine), epoch)] = (
                    float(total[lane]),
                    params[:, lane].copy(),
                    buffer[:, lane].copy(),
                    bool(has_buffer[lane]),
                )

    def result(self, engine: _GroupedEngine, epoch: int) -> tuple[float, Array, Array, bool]:
        return self.results[(id(engine), epoch)]


@dataclass
class PackResult:
    """Each member's result by key; members refused before training carry their error."""

    results: dict[str, RunResult]
    errors: dict[str, str]


def _batch_order(engine: FusedEngine, epoch: int) -> tuple[Any, ...]:
    spec = engine.spec
    return (spec.batch_size, engine.reshuffle, spec.seed if engine.reshuffle else None, epoch)


def train_pack(
    members: Sequence[Member],
    data: TrainData,
    *,
    chunk_epochs: int,
    chunk_seconds: float,
    after_chunk: Callable[[dict[str, RunResult], list[str]], None] | None = None,
    device: torch.device | None = None,
) -> PackResult:
    """Train every member on the shared ``data``, a chunk of epochs at a time for all.

    ``device`` runs the pack as stacked tensors on that torch device (the CUDA path, which
    runs as well on the cpu device); without it, the compiled CPU kernels train it.

    ``after_chunk(finished, running)`` is called once every member has reported the chunk's
    epochs, with the results of the members that stopped in it and the keys of those still
    running (the worker finishes the first and writes the others' progress then).
    """
    from workers.engines import _check_data

    began = time.perf_counter()
    errors: dict[str, str] = {}
    specs = [m.spec for m in members]
    minibatch = any(s.batch_size is not None and s.batch_size < len(data.y) for s in specs)
    intercepts = {s.model.fit_intercept for s in specs}
    if len(intercepts) > 1:
        raise StateError("pack: members differ in fit_intercept, so share no statistics")
    intercept = intercepts.pop() if intercepts else True
    shared = None
    if device is not None:
        from workers.engines.fused_torch import prepare

        shared = prepare(data, intercept, device)
        stats: FitStatistics = shared.stats
    else:
        stats = fit_statistics(data.x, data.y, intercept, keep_residual=minibatch)
    test_stats = None
    if data.x_test is not None and data.y_test is not None:
        test_stats = fit_statistics(data.x_test, data.y_test, intercept, shift=stats.shift)
    runs: dict[str, EpochRun] = {}
    grouped: list[FusedEngine] = []  # mini-batch members, stepped by their batch groups
    for member in members:
        spec = member.spec
        try:
            _check_data(spec, data)
            resume = None
            if member.resume is not None:
                resume = RunState.from_json(
                    member.resume, n_features=data.n_features, fit_intercept=intercept
                )
                if resume.seed != spec.seed:
                    raise StateError(
                        f"resume: checkpoint seed {resume.seed} is not the spec's {spec.seed}"
                    )
            full = spec.batch_size is None or spec.batch_size >= len(data.y)
            engine: FusedEngine
            if shared is not None:
                from workers.engines.fused_torch import TorchFusedEngine
                from workers.engines.pack_torch import DeviceGroupedEngine

                kind = TorchFusedEngine if full else DeviceGroupedEngine
                engine = kind(spec, data, shared=shared, test_stats=test_stats)
                if not full:
                    grouped.append(engine)
            elif full:
                engine = FusedEngine(spec, data, stats, test_stats)
            else:
                engine = _GroupedEngine(spec, data, stats, test_stats)
                grouped.append(engine)
            runs[member.key] = EpochRun(
                spec,
                data,
                engine,
                on_epoch=member.on_epoch,
                should_stop=member.should_stop,
                resume=resume,
            )
        except LrqError as exc:
            errors[member.key] = str(exc)
    setup = (time.perf_counter() - began) / max(len(runs), 1)
    for run in runs.values():
        run.progress.train_seconds += setup
    per_epoch: float | None = None
    reported: set[str] = set()
    while True:
        active = [run for run in runs.values() if run.running]
        if not active:
            break
        count = chunk_size(per_epoch, chunk_epochs=chunk_epochs, chunk_seconds=chunk_seconds)
        counts = {id(run): min(count, run.remaining) for run in active}
        chunk_began = time.perf_counter()
        grouped_ids = {id(engine) for engine in grouped}
        in_groups = [run for run in active if id(run.engine) in grouped_ids]
        _run_groups(in_groups, counts)
        # Each grouped member's epochs carry its share of the group's passes.
        share = (time.perf_counter() - chunk_began) / max(len(grouped), 1)
        for run in active:
            run.advance(
                counts[id(run)],
                shared_seconds=share if id(run.engine) in grouped_ids else 0.0,
            )
        per_epoch = (time.perf_counter() - chunk_began) / max(counts.values())
        if after_chunk is not None:
            stopped = {
                key: run.result()
                for key, run in runs.items()
                if not run.running and key not in reported
            }
            reported.update(stopped)
            after_chunk(stopped, [key for key, run in runs.items() if run.running])
    return PackResult({key: run.result() for key, run in runs.items()}, errors)


def _run_groups(runs: list[EpochRun], counts: dict[int, int]) -> None:
    """Form the batch groups of this chunk's mini-batch members and compute their epochs."""
    groups: dict[tuple[Any, ...], list[EpochRun]] = {}
    for run in runs:
        groups.setdefault(_batch_order(run.engine, run.progress.epoch), []).append(run)  # type: ignore[arg-type]
    for same in groups.values():
        engines: list[Any] = [run.engine for run in same]
        group: Any
        if isinstance(engines[0], _GroupedEngine):
            group = _BatchGroup(engines)
        else:
            from workers.engines.pack_torch import DeviceBatchGroup

            group = DeviceBatchGroup(engines)
        for engine in engines:
            engine.group = group
        group.run(same[0].progress.epoch, max(counts[id(run)] for run in same))
