"""The ``fused`` engine on a torch device (CUDA): the data's passes as batched products there.

The mathematics is fused.py's. On the device: the statistics pass (one product over
``[1, X, y]``, then the shifted residual's), and per mini-batch epoch the permuted gather,
every batch's statistics by batched products, and the step recursion as an inclusive scan of
the batches' affine maps (pairwise composition, log-depth). The full-batch epochs are maps of a
few numbers and run on the host as on the CPU engine. The same code runs with device=cpu, which
is how it is tested where there is no GPU.
"""

from __future__ import annotations

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


def batch_maps(
    spec: JobSpec, gram: torch.Tensor, cross: torch.Tensor, sizes: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each batch's SGD step as an affine map of ``[δ, buffer, 1]``: the usual and the first."""
    options = spec.optimizer
    count, width = cross.shape
    eye = torch.eye(width, dtype=torch.float64, device=gram.device)
    scale = 2.0 / sizes if spec.loss.reduction == "mean" else torch.full_like(sizes, 2.0)
    lr, mu, decay = options.lr, options.momentum, options.weight_decay
    kept = 1.0 - options.dampening
    # The batch gradient at p* + δ is Kδ + g0.
    k = scale[:, None, None] * gram + decay * eye
    g0 = decay * shift - scale[:, None] * cross
    if mu == 0:
        step = torch.zeros((count, width + 1, width + 1), dtype=torch.float64, device=gram.device)
        step[:, :width, :width] = eye - lr * k
        step[:, :width, width] = -lr * g0
        step[:, width, width] = 1.0
        return step, step
    size = 2 * width + 1
    along_grad = 1.0 + mu * kept if options.nesterov else kept
    along_buffer = mu * mu if options.nesterov else mu
    step = torch.zeros((count, size, size), dtype=torch.float64, device=gram.device)
    step[:, :width, :width] = eye - lr * along_grad * k
    step[:, :width, width : 2 * width] = -lr * along_buffer * eye
    step[:, :width, -1] = -lr * along_grad * g0
    step[:, width : 2 * width, :width] = kept * k
    step[:, width : 2 * width, width : 2 * width] = mu * eye
    step[:, width : 2 * width, -1] = kept * g0
    step[:, -1, -1] = 1.0
    first_grad = 1.0 + mu if options.nesterov else 1.0
    first = torch.zeros_like(step)
    first[:, :width, :width] = eye - lr * first_grad * k
    first[:, :width, -1] = -lr * first_grad * g0
    first[:, width : 2 * width, :width] = k
    first[:, width : 2 * width, -1] = g0
    first[:, -1, -1] = 1.0
    return step, first


def inclusive_scan(maps: torch.Tensor) -> torch.Tensor:
    """``maps[k] @ … @ maps[0]`` for every k, by pairwise composition in log2(len) rounds."""
    out = maps.clone()
    reach = 1
    while reach < len(out):
        out[reach:] = torch.bmm(out[reach:], out[:-reach].clone())
        reach *= 2
    return out


class TorchFusedEngine(FusedEngine):
    """The fused engine with its data-sized work on a torch device."""

    def __init__(self, spec: JobSpec, data: TrainData, device: torch.device | None = None) -> None:
        where = resolve_device(spec.device) if device is None else device
        x = torch.as_tensor(np.ascontiguousarray(data.x), dtype=torch.float64, device=where)
        y = torch.as_tensor(np.ascontiguousarray(data.y), dtype=torch.float64, device=where)
        stats, self._rows, self._residual = device_statistics(
            x, y, data.x, data.y, spec.model.fit_intercept
        )
        super().__init__(spec, data, stats=stats)
        self.device = str(where)
        self._where = where
        self._shift = torch.as_tensor(stats.shift, device=where)

    def _epoch(self, order: npt.NDArray[np.int64], batch_size: int) -> float:
        rows, residual = self._rows, self._residual
        if len(order):
            index = torch.from_numpy(order).to(self._where)
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
        gram, cross = torch.cat(grams), torch.cat(crosses)
        square = torch.cat(squares)
        step, first = batch_maps(
            self.spec, gram, cross, torch.cat(sizes).to(self._where), self._shift
        )
        if self.has_momentum and not self.has_buffer:
            step = torch.cat([first[:1], step[1:]])
        state = torch.as_tensor(self._vector(self.params, self.buffer), device=self._where)
        after = inclusive_scan(step) @ state
        before = torch.cat([state.reshape(1, -1), after[:-1]])
        delta = before[:, :width]
        quadratic = torch.einsum("bi,bij,bj->b", delta, gram, delta)
        sse = float((square + quadratic - 2.0 * (delta * cross).sum(1)).sum().item())
        if not abs(sse) <= _NEAR_OVERFLOW:
            # Near overflow the expanded form can overflow where the loop's sums of squared
            # residuals do not (or the reverse): sum those, batch after batch, as the loop does.
            sse = _direct_sse(rows, residual, delta, batch_size)
        end = after[-1].cpu().numpy()
        self.params = self.stats.shift + end[:width]
        if self.has_momentum:
            self.buffer = end[width : 2 * width].copy()
            self.has_buffer = True
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
