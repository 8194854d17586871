"""Compiled kernels of the fused CPU engine.

Every sum runs in a fixed order (rows in fixed blocks, each block in eight interleaved running
sums, the blocks in order), on one thread, and no fast-math flag lets the compiler reorder or
fuse an operation: a run's numbers are the same bits at any thread count and on any IEEE host.
Parameters live over the design row ``[1, x]`` (``[x]`` without an intercept), targets are
shifted by the least-squares fit ``p*`` (``r = y - a·p*``), and the step is torch.optim.SGD's.
"""

from __future__ import annotations

import numba
import numpy as np

#: Rows per block of a statistics pass; fixed, so the summation order never depends on the data.
BLOCK = 4096


@numba.njit(cache=True, inline="always")
def _dot(u, v, count):  # type: ignore[no-untyped-def]
    # Eight running sums in a fixed order: independent chains the CPU overlaps, and lanes a
    # vectorizer may pack without changing any result.
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    i = 0
    while i + 8 <= count:
        s0 += u[i] * v[i]
        s1 += u[i + 1] * v[i + 1]
        s2 += u[i + 2] * v[i + 2]
        s3 += u[i + 3] * v[i + 3]
        s4 += u[i + 4] * v[i + 4]
        s5 += u[i + 5] * v[i + 5]
        s6 += u[i + 6] * v[i + 6]
        s7 += u[i + 7] * v[i + 7]
        i += 8
    while i < count:
        s0 += u[i] * v[i]
        i += 1
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@numba.njit(cache=True)
def _columns(x, y, start, count, out):  # type: ignore[no-untyped-def]
    """Rows ``start … start + count`` of ``[1, x, y]`` as the columns of ``out``."""
    d = x.shape[1]
    for i in range(count):
        out[0, i] = 1.0
        for j in range(d):
            out[1 + j, i] = x[start + i, j]
        out[d + 1, i] = y[start + i]


@numba.njit(cache=True)
def augmented_gram(x, y):  # type: ignore[no-untyped-def]
    """Gram matrix of the rows ``[1, x, y]``, in one pass."""
    n, d = x.shape
    m = d + 2
    columns = np.empty((m, BLOCK))
    total = np.zeros((m, m))
    for start in range(0, n, BLOCK):
        count = min(BLOCK, n - start)
        _columns(x, y, start, count, columns)
        for a in range(m):
            for b in range(a, m):
                total[a, b] += _dot(columns[a], columns[b], count)
    for a in range(m):
        for b in range(a):
            total[a, b] = total[b, a]
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


@numba.njit(cache=True)
def _sum(u, count):  # type: ignore[no-untyped-def]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    i = 0
    while i + 8 <= count:
        s0 += u[i]
        s1 += u[i + 1]
        s2 += u[i + 2]
        s3 += u[i + 3]
        s4 += u[i + 4]
        s5 += u[i + 5]
        s6 += u[i + 6]
        s7 += u[i + 7]
        i += 8
    while i < count:
        s0 += u[i]
        i += 1
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@numba.njit(cache=True)
def shifted_gram(x, y, intercept, shift, y_center, residual):  # type: ignore[no-untyped-def]
    """Gram matrix of the rows ``[1, x, r, y - y_center]``, ``r = y - a·shift``, in one pass.

    Of the last column only its sum and its square's are formed (R² needs no more); the rest
    of its row is left zero. ``residual``, when it has n entries, receives r.
    """
    n, d = x.shape
    lead = 1 if intercept else 0
    m = d + 3
    keep = residual.shape[0] == n
    columns = np.empty((m, BLOCK))
    total = np.zeros((m, m))
    for start in range(0, n, BLOCK):
        count = min(BLOCK, n - start)
        # Column by column: each inner loop writes one contiguous row.
        for j in range(d):
            column = columns[1 + j]
            for i in range(count):
                column[i] = x[start + i, j]
        fitted = columns[d + 1]
        for i in range(count):
            fitted[i] = shift[0] if intercept else 0.0
        for j in range(d):
            column, weight = columns[1 + j], shift[lead + j]
            for i in range(count):
                fitted[i] += column[i] * weight
        centered = columns[d + 2]
        for i in range(count):
            target = y[start + i]
            fitted[i] = target - fitted[i]
            centered[i] = target - y_center
        if keep:
            residual[start : start + count] = fitted[:count]
        total[0, 0] += count
        for a in range(1, d + 2):
            total[0, a] += _sum(columns[a], count)
            for b in range(a, d + 2):
                total[a, b] += _dot(columns[a], columns[b], count)
        total[0, d + 2] += _sum(centered, count)
        total[d + 2, d + 2] += _dot(centered, centered, count)
    for a in range(m):
        for b in range(a):
            total[a, b] = total[b, a]
    return total
