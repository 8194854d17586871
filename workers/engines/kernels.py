"""Compiled kernels of the fused CPU engine.

Every sum runs in a fixed order: rows in fixed blocks, each block summed in row order, the
blocks' partial sums added in block order. Threads only choose which block they sum, and no
fast-math flag lets the compiler reorder or fuse an operation, so a run's numbers are the same
bits at any thread count and on any IEEE host. Parameters live over the design row
``[1, x]`` (``[x]`` without an intercept), targets are shifted by the least-squares fit ``p*``
(``r = y - a·p*``), and the step is torch.optim.SGD's.
"""

from __future__ import annotations

import numba
import numpy as np

#: Rows per block of a statistics pass; fixed, so the summation order never depends on threads.
BLOCK = 8192


@numba.njit(cache=True, parallel=True)
def augmented_gram(x, y, intercept):  # type: ignore[no-untyped-def]
    """Gram matrix of the rows ``[1, x, y]`` (``[x, y]`` without an intercept)."""
    n, d = x.shape
    lead = 1 if intercept else 0
    m = d + lead + 1
    blocks = (n + BLOCK - 1) // BLOCK
    partial = np.zeros((blocks, m, m))
    for block in numba.prange(blocks):
        row = np.empty(m)
        part = partial[block]
        for i in range(block * BLOCK, min((block + 1) * BLOCK, n)):
            if intercept:
                row[0] = 1.0
            for j in range(d):
                row[lead + j] = x[i, j]
            row[m - 1] = y[i]
            for a in range(m):
                ra = row[a]
                for b in range(a, m):
                    part[a, b] += ra * row[b]
    total = np.zeros((m, m))
    for block in range(blocks):
        for a in range(m):
            for b in range(a, m):
                total[a, b] += partial[block, a, b]
    for a in range(m):
        for b in range(a):
            total[a, b] = total[b, a]
    return total


@numba.njit(cache=True, parallel=True)
def residual_moments(x, y, intercept, shift, y_center, residual):  # type: ignore[no-untyped-def]
    """``c = Σ a·r``, ``Σ r²`` and ``Σ (y - y_center)²`` for ``r = y - a·shift``.

    ``residual``, when it has n entries, receives r (the mini-batch engine steps on it).
    """
    n, d = x.shape
    lead = 1 if intercept else 0
    width = d + lead
    keep = residual.shape[0] == n
    blocks = (n + BLOCK - 1) // BLOCK
    partial = np.zeros((blocks, width + 2))
    for block in numba.prange(blocks):
        part = partial[block]
        for i in range(block * BLOCK, min((block + 1) * BLOCK, n)):
            fit = shift[0] if intercept else 0.0
            for j in range(d):
                fit += x[i, j] * shift[lead + j]
            r = y[i] - fit
            if keep:
                residual[i] = r
            if intercept:
                part[0] += r
            for j in range(d):
                part[lead + j] += x[i, j] * r
            part[width] += r * r
            centered = y[i] - y_center
            part[width + 1] += centered * centered
    total = np.zeros(width + 2)
    for block in range(blocks):
        for k in range(width + 2):
            total[k] += partial[block, k]
    return total


@numba.njit(cache=True)
def solve(matrix, rhs):  # type: ignore[no-untyped-def]
    """``matrix⁻¹ rhs`` by Gaussian elimination with partial pivoting, in a fixed order."""
    size = rhs.shape[0]
    a = matrix.copy()
    b = rhs.copy()
    for col in range(size):
        pivot = col
        for row in range(col + 1, size):
            if abs(a[row, col]) > abs(a[pivot, col]):
                pivot = row
        if a[pivot, col] == 0.0:
            return np.full(size, np.nan)
        if pivot != col:
            for k in range(size):
                a[col, k], a[pivot, k] = a[pivot, k], a[col, k]
            b[col], b[pivot] = b[pivot], b[col]
        for row in range(col + 1, size):
            factor = a[row, col] / a[col, col]
            for k in range(col, size):
                a[row, k] -= factor * a[col, k]
            b[row] -= factor * b[col]
    out = np.zeros(size)
    for row in range(size - 1, -1, -1):
        acc = b[row]
        for k in range(row + 1, size):
            acc -= a[row, k] * out[k]
        out[row] = acc / a[row, row]
    return out


@numba.njit(cache=True)
def matmul(a, b):  # type: ignore[no-untyped-def]
    """``a @ b`` summed in index order."""
    rows, inner = a.shape
    cols = b.shape[1]
    out = np.zeros((rows, cols))
    for i in range(rows):
        for k in range(inner):
            aik = a[i, k]
            for j in range(cols):
                out[i, j] += aik * b[k, j]
    return out


@numba.njit(cache=True)
def power_table(step, length):  # type: ignore[no-untyped-def]
    """``step¹ … step^length`` by doubling: powers ``m+1 … 2m`` are ``step^m`` times ``1 … m``."""
    size = step.shape[0]
    table = np.empty((length, size, size))
    table[0] = step
    have = 1
    while have < length:
        top = table[have - 1]
        for i in range(min(have, length - have)):
            table[have + i] = matmul(top, table[i])
        have = min(2 * have, length)
    return table


@numba.njit(cache=True)
def apply(matrix, vector):  # type: ignore[no-untyped-def]
    size = vector.shape[0]
    out = np.zeros(size)
    for i in range(size):
        acc = 0.0
        for k in range(size):
            acc += matrix[i, k] * vector[k]
        out[i] = acc
    return out


@numba.njit(cache=True)
def quadratic_losses(deltas, gram, cross, rss):  # type: ignore[no-untyped-def]
    """``rss + δᵀGδ - 2δᵀc`` for each row δ: the summed squared error at ``p* + δ``."""
    count, width = deltas.shape
    out = np.empty(count)
    for e in range(count):
        quad = 0.0
        lin = 0.0
        for a in range(width):
            acc = 0.0
            for b in range(width):
                acc += gram[a, b] * deltas[e, b]
            quad += deltas[e, a] * acc
            lin += deltas[e, a] * cross[a]
        out[e] = rss + (quad - 2.0 * lin)
    return out


@numba.njit(cache=True)
def minibatch_epoch(  # type: ignore[no-untyped-def]
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
):
    """One epoch of SGD over the batches of ``order``; updates params/buffer, returns its SSE.

    ``order`` empty means rows in their stored order. Returns (sse, has_buffer).
    """
    n, d = x.shape
    lead = 1 if intercept else 0
    width = d + lead
    delta = np.empty(width)
    grad = np.empty(width)
    shuffled = order.shape[0] == n
    total = 0.0
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        for k in range(width):
            delta[k] = params[k] - shift[k]
            grad[k] = 0.0
        sse = 0.0
        for pos in range(start, stop):
            i = order[pos] if shuffled else pos
            error = delta[0] if intercept else 0.0
            for j in range(d):
                error += x[i, j] * delta[lead + j]
            error -= residual[i]
            sse += error * error
            if intercept:
                grad[0] += error
            for j in range(d):
                grad[lead + j] += error * x[i, j]
        total += sse
        scale = 2.0 / (stop - start) if mean else 2.0
        for k in range(width):
            g = scale * grad[k]
            if decay != 0.0:
                g = g + decay * params[k]
            if momentum != 0.0:
                if has_buffer:
                    buffer[k] = momentum * buffer[k] + kept * g
                else:
                    buffer[k] = g
                g = g + momentum * buffer[k] if nesterov else buffer[k]
            params[k] = params[k] - lr * g
        if momentum != 0.0:
            has_buffer = True
    return total, has_buffer


@numba.njit(cache=True)
def anchored_states(table, step, offset, count, anchor):  # type: ignore[no-untyped-def]
    """States ``offset + 1 … offset + count`` epochs after ``anchor``: ``step^j · anchor``.

    Powers of a diverging map overflow before the state does; from the first non-finite
    power on, the states are stepped one map at a time from the last finite one.
    """
    size = anchor.shape[0]
    out = np.empty((count, size))
    previous = anchor.copy() if offset == 0 else apply(table[offset - 1], anchor)
    stepping = False
    for j in range(count):
        row = apply(step, previous) if stepping else apply(table[offset + j], anchor)
        finite = True
        for k in range(size):
            if not np.isfinite(row[k]):
                finite = False
        if not finite and not stepping:
            stepping = True
            row = apply(step, previous)
        out[j] = row
        previous = row
    return out
