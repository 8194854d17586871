"""Where `device: auto` should pick the GPU: torch per-step time on the CPU and on CUDA for
growing batches (rows x features), side by side; prints each ratio and the crossover.

Run: ``python -m benchmarks.bench_auto_device [--repeats N] [--epochs N]``. Without CUDA only
the CPU column is measured (the GPU's fixed per-step cost then has to come from a GPU host).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from benchmarks.bench_engines import make_data, make_spec
from workers.engines import cuda_available, train

#: (rows per batch, features): one full-batch step per epoch, so an epoch is one step.
SIZES = [(256, 8), (4_096, 8), (16_384, 16), (65_536, 16), (131_072, 32), (262_144, 64)]


def seconds_per_step(device: str, rows: int, features: int, epochs: int, repeats: int) -> float:
    data = make_data(rows, features)
    spec = make_spec(
        data,
        backend="torch",
        device=device,
        epochs=epochs,
        batch_size=None,
        dtype="float32",
        optimizer={"lr": 1e-6},
    )
    train(spec, data)  # warm-up: CUDA context, kernels, allocator
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        train(spec, data)
        times.append((time.perf_counter() - began) / epochs)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=50)
    args = parser.parse_args()
    gpu = cuda_available()
    print(
        f"{'rows':>8} {'features':>8} {'elements':>10} {'cpu ms':>9} {'cuda ms':>9} {'cpu/cuda':>9}"
    )
    crossover = None
    for rows, features in SIZES:
        cpu = seconds_per_step("cpu", rows, features, args.epochs, args.repeats)
        cuda = (
            seconds_per_step("cuda", rows, features, args.epochs, args.repeats) if gpu else np.nan
        )
        ratio = cpu / cuda if gpu else np.nan
        if gpu and crossover is None and ratio > 1:
            crossover = rows * features
        print(
            f"{rows:>8} {features:>8} {rows * features:>10} {cpu * 1e3:>9.3f} "
            f"{cuda * 1e3:>9.3f} {ratio:>9.2f}"
        )
    if gpu:
        print(
            f"cuda is faster from about {crossover} batch elements"
            if crossover
            else "cpu always faster"
        )


if __name__ == "__main__":
    main()
