"""The ``fused`` CPU engine: the reference loops' mathematics at the cost of reading the data.

Parameters ``p`` live over the design row (``[1, x]`` with an intercept) and are stepped as
torch.optim.SGD steps them, in float64 whatever the spec's dtype. Targets are shifted by the
least-squares fit ``p*``: with ``δ = p - p*`` and ``r = y - a·p*``, a batch's summed squared error
is ``Σ (a·δ - r)²``, which keeps its digits when the noise is tiny.

- Full batch: one statistics pass gives ``G = AᵀA``, ``c = Aᵀr`` and ``Σr²``; every epoch is
  then one affine map ``s ↦ M s`` of ``s = [δ, momentum buffer, 1]`` and its loss is
  ``Σr² + δᵀGδ - 2δᵀc``. Epoch ``a + j`` is ``M^j`` applied to an anchor state ``s_a``; the
  powers ``M¹ … M^BLOCK`` come from a doubling scan, and a new anchor starts every BLOCK epochs.
  A checkpoint carries its anchor, so a resume recomputes the same numbers bit for bit.
- Mini-batches: each epoch is one compiled pass over that epoch's permutation (the reference
  loop's ``epoch_order``), stepping on the shifted targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from service.errors import StateError
from service.spec import ExplicitInit, JobSpec
from workers.engines import kernels
from workers.engines.base import Array, Params, Status, TrainData, epoch_order
from workers.engines.epochs import Chunk, EpochState
from workers.engines.state import Anchor, Optimum, RunState, Summary

#: Epochs computed from one anchor as powers of the epoch map.
ANCHOR_EPOCHS = 64
_FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Losses above this are recomputed from the data: their overflow is decided as the loop decides.
_NEAR_OVERFLOW = 1e300
#: An empty order: rows in their stored order.
_UNSHUFFLED = np.empty(0, dtype=np.int64)


@dataclass(frozen=True)
class FitStatistics:
    """One dataset's sufficient statistics about a shift ``p*`` (the training set's fit)."""

    rows: int
    fit_intercept: bool
    shift: Array  # p*, over the design row
    gram: Array  # AᵀA
    cross: Array  # Aᵀr, r = y - A p*
    rss: float  # Σ r²
    tss: float  # Σ (y - ȳ)²
    residual: Array  # r, when kept for mini-batches; else empty

    def sse(self, delta: Array) -> Array:
        """The summed squared error at ``p* + δ`` for each row of ``delta``."""
        return np.asarray(kernels.quadratic_losses(delta, self.gram, self.cross, self.rss))

    def optimum(self) -> Optimum:
        """The least-squares fit: ``p*`` refined by one step on its residual's gradient."""
        step = np.asarray(kernels.solve(self.gram, self.cross))
        if not np.all(np.isfinite(step)):
            step = np.zeros_like(self.shift)
        rss = float(self.sse(step.reshape(1, -1))[0])
        best = self.shift + step
        weights, bias = split(best, self.fit_intercept)
        return Optimum(weights, bias, max(rss, 0.0), self.rows)


#: Rows whose normal equations give the shift: close enough to the fit that the residuals
#: keep their digits, and a fixed prefix, so the shift is a function of the data alone.
SHIFT_ROWS = 2 * kernels.BLOCK


def fit_statistics(
    x: Array,
    y: Array,
    fit_intercept: bool,
    *,
    shift: Array | None = None,
    keep_residual: bool = False,
) -> FitStatistics:
    """One pass over the data: the Gram matrix of ``[1, x, r, y - ȳ₀]`` about a shift ``p*``.

    Without a given shift, ``p*`` solves the normal equations of the first SHIFT_ROWS rows;
    any shift near the fit serves, since every loss is computed about it.
    """
    x = np.ascontiguousarray(x, dtype=np.float64)
    y = np.ascontiguousarray(y, dtype=np.float64)
    n, d = x.shape
    design = slice(0 if fit_intercept else 1, d + 1)
    head = min(n, SHIFT_ROWS)
    if shift is None:
        sample = np.asarray(kernels.augmented_gram(x[:head], y[:head]))
        shift = _least_squares(
            x, y, sample[design, design], sample[design, d + 1], fit_intercept, head
        )
    center = float(np.mean(y[:head]))
    residual = np.empty(n if keep_residual else 0)
    gram = np.asarray(kernels.shifted_gram(x, y, fit_intercept, shift, center, residual))
    offset = float(gram[0, d + 2])  # Σ (y - ȳ₀)
    return FitStatistics(
        rows=n,
        fit_intercept=fit_intercept,
        shift=shift,
        gram=np.ascontiguousarray(gram[design, design]),
        cross=gram[design, d + 1].copy(),
        rss=float(gram[d + 1, d + 1]),
        tss=float(gram[d + 2, d + 2]) - offset * offset / n,
        residual=residual,
    )


def _least_squares(
    x: Array, y: Array, gram: Array, moment: Array, fit_intercept: bool, rows: int
) -> Array:
    # The normal equations are exact enough for a shift (losses are computed about it); a
    # singular or near-singular Gram matrix takes lstsq's minimum-norm solution of all rows.
    if rows >= len(moment) and np.linalg.cond(gram) < 1e10:
        solution = np.asarray(kernels.solve(gram, moment))
        if np.all(np.isfinite(solution)):
            return solution
    design = np.hstack([np.ones((len(y), 1)), x]) if fit_intercept else x
    return np.linalg.lstsq(design, y, rcond=None)[0].astype(np.float64)


def split(vector: Array, fit_intercept: bool) -> Params:
    """A design-row vector as (weights, bias)."""
    if fit_intercept:
        return vector[1:].copy(), float(vector[0])
    return vector.copy(), None


def join(params: Params, fit_intercept: bool) -> Array:
    weights, bias = params
    head = [0.0 if bias is None else bias] if fit_intercept else []
    return np.concatenate([np.asarray(head, dtype=np.float64), weights])


def initial_params(spec: JobSpec, n_features: int) -> Params:
    """The reference loop's start: explicit values, zeros, or the backend's default."""
    init = spec.model.init
    bias: float | None
    if isinstance(init, ExplicitInit):
        weights = np.asarray(init.weights, dtype=np.float64)
        bias = init.bias if spec.model.fit_intercept else None
        if spec.model.fit_intercept and bias is None:
            bias = 0.0
        return weights, bias
    if init == "default" and spec.backend == "torch":
        from workers.engines.torch_engine import default_init

        drawn = default_init(n_features, spec.model.fit_intercept, spec.seed)
        weights = drawn[0].reshape(-1).double().numpy()
        return weights, (float(drawn[1].item()) if len(drawn) > 1 else None)
    bias = 0.0 if spec.model.fit_intercept else None
    return np.zeros(n_features), bias


@dataclass
class _Trail:
    """The states after each epoch of the last chunk, made into EpochStates only when asked."""

    before: EpochState
    intercept: bool
    params: list[Array] | Array = field(default_factory=list)
    buffers: list[Array] | Array | None = None
    anchors: list[Anchor | None] = field(default_factory=list)

    def at(self, index: int) -> EpochState:
        if index < 0:
            return self.before
        buffers = self.buffers
        return EpochState(
            split(self.params[index], self.intercept),
            None if buffers is None else split(buffers[index], self.intercept),
            self.anchors[index],
        )


class FusedEngine:
    """Full batch by powers of the epoch map; mini-batches by one compiled pass an epoch."""

    name = "fused"
    device = "cpu"

    def __init__(
        self,
        spec: JobSpec,
        data: TrainData,
        stats: FitStatistics | None = None,
        test_stats: FitStatistics | None = None,
    ) -> None:
        self.spec = spec
        self.intercept = spec.model.fit_intercept
        self.x = np.ascontiguousarray(data.x, dtype=np.float64)
        self.y = data.y
        self.x_test, self.y_test = data.x_test, data.y_test
        self.rows = len(data.y)
        self.full_batch = spec.batch_size is None or spec.batch_size >= self.rows
        self.reshuffle = spec.shuffle and not self.full_batch
        keep = not self.full_batch
        if stats is None:
            stats = fit_statistics(data.x, data.y, self.intercept, keep_residual=keep)
        self.stats = stats
        self.test: FitStatistics | None = test_stats
        if test_stats is None and data.x_test is not None and data.y_test is not None:
            self.test = fit_statistics(data.x_test, data.y_test, self.intercept, shift=stats.shift)
        self.true_weights, self.true_bias = data.true_weights, data.true_bias
        self.divisor = float(self.rows) if spec.loss.reduction == "mean" else 1.0
        self.limit = _FLOAT32_MAX if spec.dtype == "float32" else np.inf
        options = spec.optimizer
        self.has_momentum = options.momentum != 0
        self.width = len(stats.shift)
        self._start = initial_params(spec, data.n_features)
        self.params = join(self._start, self.intercept)
        self.buffer = np.zeros(self.width)
        self.has_buffer = False
        self.anchor: tuple[int, Array, Array] | None = None  # epoch, params, buffer
        self.trail = _Trail(self._now(None), self.intercept)
        if self.full_batch:
            self.step_map, self.first_map = _epoch_maps(spec, stats)
            self.table = np.asarray(kernels.power_table(self.step_map, ANCHOR_EPOCHS))

    # -- state ------------------------------------------------------------------------------

    def _now(self, anchor: Anchor | None) -> EpochState:
        return EpochState(
            split(self.params, self.intercept),
            split(self.buffer, self.intercept) if self.has_buffer else None,
            anchor,
        )

    def initial(self) -> Params:
        return self._start

    def restore(self, state: RunState) -> None:
        if state.momentum is not None and not self.has_momentum:
            raise StateError("resume: checkpoint has momentum buffers but the spec has none")
        self.params = join(state.params, self.intercept)
        self.has_buffer = state.momentum is not None
        self.buffer = (
            join(state.momentum, self.intercept) if state.momentum else np.zeros(self.width)
        )
        self.anchor = None
        if self.full_batch and state.anchor is not None and state.epoch > 0:
            a = state.anchor
            buffer = (
                np.zeros(self.width) if a.momentum is None else join(a.momentum, self.intercept)
            )
            self.anchor = (a.epoch, join(a.params, self.intercept), buffer)
        self.trail = _Trail(self._now(self._anchor_json()), self.intercept)

    def _anchor_json(self) -> Anchor | None:
        if self.anchor is None:
            return None
        epoch, params, buffer = self.anchor
        momentum = split(buffer, self.intercept) if self.has_momentum else None
        return Anchor(epoch, split(params, self.intercept), momentum)

    def state_after(self, index: int) -> EpochState:
        return self.trail.at(index)

    def keep(self, index: int) -> None:
        state = self.trail.at(index)
        self._set(state)
        self.trail = _Trail(state, self.intercept)

    def _set(self, state: EpochState) -> None:
        self.params = join(state.params, self.intercept)
        self.has_buffer = state.momentum is not None
        if state.momentum is not None:
            self.buffer = join(state.momentum, self.intercept)
        if self.full_batch:
            a = state.anchor
            if a is None:
                self.anchor = None
            else:
                buffer = (
                    np.zeros(self.width) if a.momentum is None else join(a.momentum, self.intercept)
                )
                self.anchor = (a.epoch, join(a.params, self.intercept), buffer)

    # -- epochs -----------------------------------------------------------------------------

    def advance(self, start: int, count: int, evaluate: npt.NDArray[np.bool_]) -> Chunk:
        if self.full_batch:
            return self._advance_full(start, count, evaluate)
        return self._advance_mini(start, count, evaluate)

    def _bad(self, value: float) -> bool:
        # A float32 loop overflows to inf where float64 still counts: the same epoch diverges.
        return not (np.isfinite(value) and abs(value) <= self.limit)

    def _bad_array(self, values: Array) -> npt.NDArray[np.bool_]:
        return ~(np.isfinite(values) & (np.abs(values) <= self.limit))

    def _advance_mini(self, start: int, count: int, evaluate: npt.NDArray[np.bool_]) -> Chunk:
        spec = self.spec
        batch_size = spec.batch_size or self.rows
        params: list[Array] = []
        buffers: list[Array] = []
        train: list[float] = []
        test: list[float] = []
        diverged = False
        for index in range(count):
            epoch = start + index + 1
            before = self.params.copy(), self.buffer.copy(), self.has_buffer
            loss = self._mini_epoch(epoch, batch_size) / self.divisor
            test_loss = np.nan
            if evaluate[index]:
                test_loss = self._test_losses(self.params.reshape(1, -1))[0]
            if self._bad(loss) or (evaluate[index] and self._bad(test_loss)):
                self.params, self.buffer, self.has_buffer = before
                diverged = True
                break
            train.append(loss)
            test.append(test_loss)
            params.append(self.params.copy())
            buffers.append(self.buffer.copy())
        self.trail = _Trail(
            self.trail.at(len(self.trail.anchors) - 1),
            self.intercept,
            params,
            buffers if self.has_buffer else None,
            [None] * len(params),
        )
        return Chunk(np.asarray(train), np.asarray(test), diverged)

    def _mini_epoch(self, epoch: int, batch_size: int) -> float:
        """Mini-batch epoch ``epoch`` in its batch order; its summed squared error."""
        order = (
            epoch_order(self.rows, seed=self.spec.seed, epoch=epoch, shuffle=True)
            if self.reshuffle
            else _UNSHUFFLED
        )
        return self._epoch(order, batch_size)

    def _epoch(self, order: npt.NDArray[np.int64], batch_size: int) -> float:
        """One mini-batch epoch over ``order`` (empty: stored order); its summed squared error."""
        options = self.spec.optimizer
        sse, self.has_buffer = kernels.minibatch_epoch(
            self.x,
            self.stats.residual,
            order,
            self.intercept,
            batch_size,
            self.spec.loss.reduction == "mean",
            self.stats.shift,
            self.params,
            self.buffer,
            self.has_buffer,
            options.lr,
            options.momentum,
            1.0 - options.dampening,
            options.weight_decay,
            options.nesterov,
        )
        return float(sse)

    def _test_losses(self, params: Array) -> Array:
        assert self.test is not None
        return self.test.sse(params - self.stats.shift) / (
            float(self.test.rows) if self.spec.loss.reduction == "mean" else 1.0
        )

    def _vector(self, params: Array, buffer: Array) -> Array:
        parts = [params - self.stats.shift]
        if self.has_momentum:
            parts.append(buffer)
        return np.concatenate([*parts, [1.0]])

    def _advance_full(self, start: int, count: int, evaluate: npt.NDArray[np.bool_]) -> Chunk:
        width, shift = self.width, self.stats.shift
        rows: list[Array] = []  # the states [δ, buffer, 1] after each epoch, in blocks
        anchors: list[Anchor | None] = []
        epoch = start
        has_buffer = self.has_buffer
        if self.has_momentum and not has_buffer:
            # torch's first momentum step sets the buffer to the gradient: its own map.
            first = kernels.apply(self.first_map, self._vector(self.params, self.buffer))
            rows.append(np.asarray(first).reshape(1, -1))
            epoch += 1
            self.anchor = self._anchor_at(epoch, rows[-1][-1])
            anchors.append(self._anchor_json())
            has_buffer = True
        if self.anchor is None:
            self.anchor = (epoch, self.params.copy(), self.buffer.copy())
        while epoch < start + count:
            a_epoch, a_params, a_buffer = self.anchor
            offset = epoch - a_epoch
            if offset == ANCHOR_EPOCHS:
                self.anchor = (
                    self._anchor_at(epoch, rows[-1][-1])
                    if rows
                    else (epoch, self.params.copy(), self.buffer.copy())
                )
                continue
            steps = min(ANCHOR_EPOCHS - offset, start + count - epoch)
            block = kernels.anchored_states(
                self.table, self.step_map, offset, steps, self._vector(a_params, a_buffer)
            )
            rows.append(np.asarray(block))
            anchors.extend([self._anchor_json()] * steps)
            epoch += steps
        states = np.concatenate(rows)
        params = shift + states[:, :width]
        # Losses from the parameters as stored, so that a resume from any epoch's checkpoint
        # recomputes the same bits.
        before = np.concatenate([self.params.reshape(1, -1), params[:-1]]) - shift
        train = self.stats.sse(before) / self.divisor
        test = np.full(count, np.nan)
        if self.test is not None and evaluate.any():
            test[evaluate] = self._test_losses(params[evaluate])
        done = self._first_bad(train, test, evaluate, before + shift, params)
        self.trail = _Trail(
            self.trail.at(len(self.trail.anchors) - 1),
            self.intercept,
            params[:done],
            states[:done, width : 2 * width] if has_buffer else None,
            anchors[:done],
        )
        self._set(self.trail.at(done - 1))
        return Chunk(train[:done], test[:done], done < count)

    def _first_bad(
        self,
        train: Array,
        test: Array,
        evaluate: npt.NDArray[np.bool_],
        before: Array,
        after: Array,
    ) -> int:
        """The index of the first epoch the loop would find non-finite (len(train) if none).

        Near overflow a quadratic form can overflow where the loop's sum of squares does not
        (or the reverse), so there the losses are recomputed as the loop computes them.
        """
        edge = min(self.limit, _NEAR_OVERFLOW)
        doubtful = ~(np.abs(train) <= edge) | (evaluate & ~(np.abs(test) <= edge))
        for index in np.flatnonzero(doubtful):
            train[index] = _direct_loss(self.x, self.y, before[index], self.divisor)
            if evaluate[index]:
                assert self.x_test is not None and self.y_test is not None
                mean = self.spec.loss.reduction == "mean"
                rows = float(len(self.y_test)) if mean else 1.0
                test[index] = _direct_loss(self.x_test, self.y_test, after[index], rows)
            if self._bad(float(train[index])) or (evaluate[index] and self._bad(test[index])):
                return int(index)
        return len(train)

    def _anchor_at(self, epoch: int, state: Array) -> tuple[int, Array, Array]:
        # Anchors are kept as parameters, as a checkpoint holds them, so a resume starts
        # from exactly the same vector.
        width = self.width
        buffer = state[width : 2 * width].copy() if self.has_momentum else np.zeros(width)
        return epoch, self.stats.shift + state[:width], buffer

    # -- result -----------------------------------------------------------------------------

    def summary(self, status: Status) -> Summary:
        spec, stats = self.spec, self.stats
        reduction = spec.loss.reduction
        optimum = stats.optimum()
        delta = (self.params - stats.shift).reshape(1, -1)
        with np.errstate(all="ignore"):
            sse = _sse(stats, delta, self.x, self.y, self.params)
            final = sse / self.divisor
            weights, bias = split(self.params, self.intercept)
            test_loss = test_r2 = coef_error = None
            if self.test is not None:
                assert self.x_test is not None and self.y_test is not None
                test_sse = _sse(self.test, delta, self.x_test, self.y_test, self.params)
                test_loss = test_sse / (self.test.rows if reduction == "mean" else 1)
                test_r2 = 1.0 - test_sse / self.test.tss if self.test.tss else None
            if self.true_weights is not None:
                errors = list(np.abs(weights - self.true_weights))
                if self.intercept and self.true_bias is not None and bias is not None:
                    errors.append(abs(bias - self.true_bias))
                coef_error = float(max(errors))
        return Summary(
            status=status,
            weights=weights.tolist(),
            bias=bias,
            final_loss=final,
            optimum_loss=optimum.loss(reduction),
            optimum_gap=max(final - optimum.loss(reduction), 0.0),
            optimum_weights=optimum.weights.tolist(),
            optimum_bias=optimum.bias,
            r2=1.0 - sse / stats.tss if stats.tss else None,
            test_loss=test_loss,
            test_r2=test_r2,
            coef_error=coef_error,
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


def _sse(stats: FitStatistics, delta: Array, x: Array, y: Array, params: Array) -> float:
    """The summed squared error at one point: from the statistics, or near overflow the data."""
    sse = float(stats.sse(delta)[0])
    return sse if abs(sse) <= _NEAR_OVERFLOW else _direct_loss(x, y, params, 1.0)


def _direct_loss(x: Array, y: Array, params: Array, divisor: float) -> float:
    """The loss at ``params`` summed from the residuals, as the reference loop sums it."""
    with np.errstate(all="ignore"):
        head, weights = (params[0], params[1:]) if len(params) > x.shape[1] else (0.0, params)
        residual = x @ weights + head - y
        return float(residual @ residual) / divisor


def _epoch_maps(spec: JobSpec, stats: FitStatistics) -> tuple[Array, Array]:
    """The full-batch epoch as affine maps of ``[δ, buffer, 1]``: the usual one and the first."""
    options = spec.optimizer
    width = len(stats.shift)
    eye = np.eye(width)
    scale = 2.0 / stats.rows if spec.loss.reduction == "mean" else 2.0
    lr, mu, decay = options.lr, options.momentum, options.weight_decay
    kept = 1.0 - options.dampening
    # The gradient at p* + δ is Kδ + g0.
    k = scale * stats.gram + decay * eye
    g0 = decay * stats.shift - scale * stats.cross
    if mu == 0:
        step = np.zeros((width + 1, width + 1))
        step[:width, :width] = eye - lr * k
        step[:width, width] = -lr * g0
        step[width, width] = 1.0
        return step, step
    size = 2 * width + 1
    # Nesterov steps along g + μ·b', b' = μb + (1 - dampening)g; plain momentum along b'.
    along_grad = 1.0 + mu * kept if options.nesterov else kept
    along_buffer = mu * mu if options.nesterov else mu
    step = np.zeros((size, size))
    step[:width, :width] = eye - lr * along_grad * k
    step[:width, width : 2 * width] = -lr * along_buffer * eye
    step[:width, -1] = -lr * along_grad * g0
    step[width : 2 * width, :width] = kept * k
    step[width : 2 * width, width : 2 * width] = mu * eye
    step[width : 2 * width, -1] = kept * g0
    step[-1, -1] = 1.0
    first_grad = 1.0 + mu if options.nesterov else 1.0
    first = np.zeros((size, size))
    first[:width, :width] = eye - lr * first_grad * k
    first[:width, -1] = -lr * first_grad * g0
    first[width : 2 * width, :width] = k
    first[width : 2 * width, -1] = g0
    first[-1, -1] = 1.0
    return step, first
