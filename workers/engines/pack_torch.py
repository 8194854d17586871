"""Packed sweeps on a torch device: a batch group's members as stacked tensors there.

The members of a batch group share the epoch's gather and every batch's statistics
(``AᵀA``, ``Aᵀr``, ``rᵀr``, computed once); their batch maps are stacked along a leading
member axis, and one batched pairwise scan composes every member's maps at once. Each member's
arithmetic is its solo run's on the same device (fused_torch.py), so packing changes no number
beyond the rounding of batched products.
"""

from __future__ import annotations

import numpy as np
import torch

from workers.engines.base import Array, epoch_order
from workers.engines.fused_torch import (
    BatchStatistics,
    TorchFusedEngine,
    batch_statistics,
    stacked_epoch,
    stacked_maps,
)
from workers.engines.pack import GroupedEpochs

#: The most bytes one stacked call's maps and their scan may take; larger groups are split.
STACK_BYTES = 512 * 1024 * 1024


class DeviceGroupedEngine(GroupedEpochs, TorchFusedEngine):
    """A mini-batch member whose epochs its device batch group computes, with the others."""


class DeviceBatchGroup:
    """Mini-batch members at the same epoch with the same batch order, stepped as stacks."""

    def __init__(self, engines: list[DeviceGroupedEngine]) -> None:
        self.engines = engines
        self.results: dict[tuple[int, int], tuple[float, Array, Array, bool]] = {}

    def run(self, start: int, count: int) -> None:
        """Compute epochs ``start + 1 … start + count`` for every member."""
        first = self.engines[0]
        batch_size = first.spec.batch_size or first.rows
        batches_per_epoch = -(-first.rows // batch_size)
        # Members with momentum carry a buffer in their state; they stack apart from the rest.
        lanes: dict[bool, list[DeviceGroupedEngine]] = {}
        for engine in self.engines:
            lanes.setdefault(engine.has_momentum, []).append(engine)
        states = {id(e): (e.params.copy(), e.buffer.copy(), e.has_buffer) for e in self.engines}
        self.results.clear()
        for epoch in range(start + 1, start + count + 1):
            order = (
                epoch_order(first.rows, seed=first.spec.seed, epoch=epoch, shuffle=True)
                if first.reshuffle
                else np.empty(0, dtype=np.int64)
            )
            batches = batch_statistics(first.shared, order, batch_size)
            for momentum, lane in lanes.items():
                size = (2 if momentum else 1) * first.width + 1
                each = 8 * batches_per_epoch * size * size * 3  # maps, scan, its copies
                step = max(1, STACK_BYTES // each)
                for at in range(0, len(lane), step):
                    self._epoch(lane[at : at + step], states, batches, batch_size, epoch)

    def _epoch(
        self,
        engines: list[DeviceGroupedEngine],
        states: dict[int, tuple[Array, Array, bool]],
        batches: BatchStatistics,
        batch_size: int,
        epoch: int,
    ) -> None:
        first = engines[0]
        vectors = []
        for engine in engines:
            params, buffer, _ = states[id(engine)]
            vectors.append(engine._vector(params, buffer))
        where = first.shared.where
        state = torch.as_tensor(np.stack(vectors), device=where)
        opening = [e.has_momentum and not states[id(e)][2] for e in engines]
        maps = stacked_maps([e.spec for e in engines], batches, first._shift, opening)
        after, sses = stacked_epoch(maps, state, batches, batch_size)
        ends = after.cpu().numpy()
        width = first.width
        for engine, end, sse in zip(engines, ends, sses, strict=True):
            params = engine.stats.shift + end[:width]
            old_buffer, has_buffer = states[id(engine)][1], states[id(engine)][2]
            buffer = end[width : 2 * width].copy() if engine.has_momentum else old_buffer
            has_buffer = has_buffer or engine.has_momentum
            states[id(engine)] = (params, buffer, has_buffer)
            self.results[(id(engine), epoch)] = (
                float(sse),
                params.copy(),
                buffer.copy(),
                has_buffer,
            )

    def result(self, engine: DeviceGroupedEngine, epoch: int) -> tuple[float, Array, Array, bool]:
        return self.results[(id(engine), epoch)]
