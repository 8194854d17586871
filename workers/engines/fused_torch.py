"""The ``fused`` engine on a torch device (CUDA): the data's passes as batched products there.

The mathematics is fused.py's. On the device: the statistics pass (one product over
``[1, X, y]``, then the shifted residual's), and per mini-batch epoch the permuted gather,
every batch's statistics by batched products, and the step recursion as an inclusive scan of
the batches' affine maps (pairwise composition, log-depth). The full-batch epochs are maps of a
few numbers and run on the host as on the CPU engine. The same code runs with device=cpu, which
is how it is tested where there is no GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from service.spec import JobSpec
from workers.engines.base import Array, TrainData
from workers.engines.fused import _NEAR_OVERFLOW, FitStatistics, FusedEngine, _least_squares
from workers.engines.torch_engine import resolve_device


def device_statistics(
    x: torch.Tensor, y: torch.Tensor, x_host: Array, y_host: Array, fit_intercept: bool
) -> tuple[FitStatistics, torch.Tensor, torch.Tensor]:
    """The training set's statistics computed on x's device; also the design rows and r there."""
    n = y.shape[0]
    ones = torch.ones((n, 1), dtype=torch.float64, device=x.device)
    augmented_rows = torch.cat([ones, x, y.reshape(-1, 1)], dim=1)
    augmented = (augmented_rows.T @ augmented_rows).cpu().numpy()
    design = slice(0 if fit_intercept else 1, -1)
    gram = np.ascontiguousarray(augmented[design, design])
    shift = _least_squares(x_host, y_host, gram, augmented[design, -1], fit_intercept, n)
    rows = augmented_rows[:, design]
    residual = y - rows @ torch.as_tensor(shift, device=x.device)
    centered = y - float(augmented[0, -1]) / n
    stats = FitStatistics(
        rows=n,
        fit_intercept=fit_intercept,
        shift=shift,
        gram=gram,
        cross=(rows.T @ residual).cpu().numpy(),
        rss=float(residual @ residual),
        tss=float(centered @ centered),
        residual=np.empty(0),
    )
    return stats, rows.contiguous(), residual


@dataclass(frozen=True)
class DeviceData:
    """A training set on a device: its statistics, its design rows and shifted targets there."""

    stats: FitStatistics
    rows: torch.Tensor
    residual: torch.Tensor
    where: torch.device


def prepare(data: TrainData, fit_intercept: bool, where: torch.device) -> DeviceData:
    """``data`` moved to ``where`` and its statistics pass run there (once for a whole pack)."""
    x = torch.as_tensor(np.ascontiguousarray(data.x), dtype=torch.float64, device=where)
    y = torch.as_tensor(np.ascontiguousarray(data.y), dtype=torch.float64, device=where)
    stats, rows, residual = device_statistics(x, y, data.x, data.y, fit_intercept)
    return DeviceData(stats, rows, residual, where)


@dataclass(frozen=True)
class BatchStatistics:
    """Every batch of one epoch's order: ``AᵀA``, ``Aᵀr``, ``rᵀr`` and its size."""

    gram: torch.Tensor  # (batches, width, width)
    cross: torch.Tensor  # (batches, width)
    square: torch.Tensor  # (batches,)
    sizes: torch.Tensor  # (batches,)
    rows: torch.Tensor  # the epoch's rows in batch order, for the near-overflow loss
    residual: torch.Tensor


def batch_statistics(
    device: DeviceData, order: npt.NDArray[np.int64], batch_size: int
) -> BatchStatistics:
    """The statistics of the batches of ``order`` (empty: stored order), by batched products."""
    rows, residual = device.rows, device.residual
    if len(order):
        index = torch.from_numpy(order).to(device.where)
        rows, residual = rows.index_select(0, index), residual.index_select(0, index)
    n, width = rows.shape
    full = (n // batch_size) * batch_size
    grams, crosses, squares, sizes = [], [], [], []
    if full:
        blocks = rows[:full].reshape(-1, batch_size, width)
        targets = residual[:full].reshape(-1, batch_size, 1)
        grams.append(torch.bmm(blocks.transpose(1, 2), blocks))
        crosses.append(torch.bmm(blocks.transpose(1, 2), targets).squeeze(2))
        squares.append((targets.squeeze(2) ** 2).sum(1))
        sizes.append(torch.full((len(blocks),), float(batch_size), dtype=torch.float64))
    if full < n:  # the short tail batch, never an empty one
        tail, tail_targets = rows[full:], residual[full:]
        grams.append((tail.T @ tail).unsqueeze(0))
        crosses.append((tail.T @ tail_targets).unsqueeze(0))
        squares.append((tail_targets @ tail_targets).reshape(1))
        sizes.append(torch.full((1,), float(n - full), dtype=torch.float64))
    return BatchStatistics(
        torch.cat(grams),
        torch.cat(crosses),
        torch.cat(squares),
        torch.cat(sizes).to(device.where),
        rows,
        residual,
    )


def _column(values: list[float], where: torch.device) -> torch.Tensor:
    """One scalar a member, shaped to broadcast over (members, batches, rows, columns)."""
    return torch.tensor(values, dtype=torch.float64, device=where).reshape(-1, 1, 1, 1)


def stacked_maps(
    specs: list[JobSpec], batches: BatchStatistics, shift: torch.Tensor, first: list[bool]
) -> torch.Tensor:
    """Each member's SGD step over each batch as an affine map of ``[δ, buffer, 1]``.

    Members all have momentum or none has; ``first[m]`` makes member m's first batch its
    first step ever (torch's buffer starts as the gradient). Shape (members, batches, s, s).
    """
    where = shift.device
    gram, cross = batches.gram, batches.cross
    count, width = cross.shape
    options = [spec.optimizer for spec in specs]
    members = len(specs)
    eye = torch.eye(width, dtype=torch.float64, device=where)
    mean = torch.tensor(
        [spec.loss.reduction == "mean" for spec in specs], dtype=torch.bool, device=where
    )
    scale = torch.where(mean[:, None], 2.0 / batches.sizes[None, :], 2.0)  # (members, batches)
    lr = _column([o.lr for o in options], where)
    decay = _column([o.weight_decay for o in options], where)
    # The batch gradient at p* + δ is Kδ + g0.
    k = scale[:, :, None, None] * gram[None] + decay * eye
    g0 = decay[..., 0] * shift - scale[:, :, None] * cross[None]  # (members, batches, width)
    mu_values = [o.momentum for o in options]
    if all(mu == 0 for mu in mu_values):
        step = torch.zeros(
            (members, count, width + 1, width + 1), dtype=torch.float64, device=where
        )
        step[:, :, :width, :width] = eye - lr * k
        step[:, :, :width, width] = -lr[..., 0] * g0
        step[:, :, width, width] = 1.0
        return step
    mu = _column(mu_values, where)
    kept = _column([1.0 - o.dampening for o in options], where)
    nesterov = torch.tensor([o.nesterov for o in options], dtype=torch.bool, device=where)
    nesterov = nesterov.reshape(-1, 1, 1, 1)
    along_grad = torch.where(nesterov, 1.0 + mu * kept, kept)
    along_buffer = torch.where(nesterov, mu * mu, mu)
    size = 2 * width + 1
    step = torch.zeros((members, count, size, size), dtype=torch.float64, device=where)
    step[:, :, :width, :width] = eye - lr * along_grad * k
    step[:, :, :width, width : 2 * width] = -lr * along_buffer * eye
    step[:, :, :width, -1] = -(lr * along_grad)[..., 0] * g0
    step[:, :, width : 2 * width, :width] = kept * k
    step[:, :, width : 2 * width, width : 2 * width] = mu * eye
    step[:, :, width : 2 * width, -1] = kept[..., 0] * g0
    step[:, :, -1, -1] = 1.0
    for m in (m for m, is_first in enumerate(first) if is_first):
        first_grad = 1.0 + mu_values[m] if options[m].nesterov else 1.0
        k0, g00 = k[m, 0], g0[m, 0]
        opening = torch.zeros((size, size), dtype=torch.float64, device=where)
        opening[:width, :width] = eye - lr[m, 0] * first_grad * k0
        opening[:width, -1] = -lr[m, 0, 0] * first_grad * g00
        opening[width : 2 * width, :width] = k0
        opening[width : 2 * width, -1] = g00
        opening[-1, -1] = 1.0
        step[m, 0] = opening
    return step


def inclusive_scan(maps: torch.Tensor) -> torch.Tensor:
    """``maps[..., k, :, :] @ … @ maps[..., 0, :, :]`` for every k along the batch axis (-3),
    by pairwise composition in log2(len) rounds."""
    out = maps.clone()
    count = out.shape[-3]
    reach = 1
    while reach < count:
        out[..., reach:, :, :] = torch.matmul(
            out[..., reach:, :, :], out[..., : count - reach, :, :].clone()
        )
        reach *= 2
    return out


def stacked_epoch(
    maps: torch.Tensor, states: torch.Tensor, batches: BatchStatistics, batch_size: int
) -> tuple[torch.Tensor, list[float]]:
    """Every member's epoch from its state ``[δ, buffer, 1]`` (members, s): the states after
    it (members, s) and each member's summed squared error over its batches."""
    width = batches.cross.shape[1]
    after = torch.matmul(inclusive_scan(maps), states[:, None, :, None]).squeeze(-1)
    before = torch.cat([states[:, None, :], after[:, :-1]], dim=1)
    delta = before[..., :width]  # (members, batches, width)
    quadratic = torch.einsum("mbi,bij,mbj->mb", delta, batches.gram, delta)
    linear = (delta * batches.cross[None]).sum(2)
    sses = (batches.square[None] + quadratic - 2.0 * linear).sum(1).cpu().tolist()
    for m, sse in enumerate(sses):
        if not abs(sse) <= _NEAR_OVERFLOW:
            # Near overflow the expanded form can overflow where the loop's sums of squared
            # residuals do not (or the reverse): sum those, batch after batch, as the loop does.
            sses[m] = _direct_sse(batches.rows, batches.residual, delta[m], batch_size)
    return after[:, -1], sses


class TorchFusedEngine(FusedEngine):
    """The fused engine with its data-sized work on a torch device."""

    def __init__(
        self,
        spec: JobSpec,
        data: TrainData,
        device: torch.device | None = None,
        *,
        shared: DeviceData | None = None,
        test_stats: FitStatistics | None = None,
    ) -> None:
        if shared is None:
            where = resolve_device(spec.device) if device is None else device
            shared = prepare(data, spec.model.fit_intercept, where)
        super().__init__(spec, data, stats=shared.stats, test_stats=test_stats)
        self.device = str(shared.where)
        self.shared = shared
        self._shift = torch.as_tensor(shared.stats.shift, device=shared.where)

    def state_vector(self) -> torch.Tensor:
        return torch.as_tensor(self._vector(self.params, self.buffer), device=self.shared.where)

    def take(self, end: npt.NDArray[np.float64]) -> None:
        """Become the state ``[δ, buffer, 1]`` an epoch ended in."""
        width = self.width
        self.params = self.stats.shift + end[:width]
        if self.has_momentum:
            self.buffer = end[width : 2 * width].copy()
            self.has_buffer = True

    def _epoch(self, order: npt.NDArray[np.int64], batch_size: int) -> float:
        batches = batch_statistics(self.shared, order, batch_size)
        first = self.has_momentum and not self.has_buffer
        maps = stacked_maps([self.spec], batches, self._shift, [first])
        after, (sse,) = stacked_epoch(maps, self.state_vector()[None], batches, batch_size)
        self.take(after[0].cpu().numpy())
        return sse


def _direct_sse(
    rows: torch.Tensor, targets: torch.Tensor, deltas: torch.Tensor, batch_size: int
) -> float:
    """An epoch's summed squared error from each batch's residuals at its own parameters."""
    total = 0.0
    with np.errstate(all="ignore"):
        for index, start in enumerate(range(0, len(rows), batch_size)):
            block = slice(start, start + batch_size)
            residual = rows[block] @ deltas[index] - targets[block]
            total += float((residual @ residual).item())
    return total
