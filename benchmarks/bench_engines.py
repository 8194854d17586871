"""Torch against NumPy loops on the same specs, and what checkpointing costs; prints ratios.

Run: ``python -m benchmarks.bench_engines [--repeats N] [--quick] [--threads N]``. Every
variant of a row is timed in the same round, rounds interleaved, and the median kept, so drift
hits all alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch

from service.spec import JobSpec
from workers.engines import cuda_available, train
from workers.engines.base import Checkpoint, EpochRecord, OnEpoch, TrainData


def make_data(n: int, d: int) -> TrainData:
    """Rows from the tutorial's model generalised to d features."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d))
    y = x @ np.arange(1.0, d + 1) + 3 + 1e-6 * rng.normal(size=n)
    return TrainData(x, y)


def make_spec(data: TrainData, **fields: Any) -> JobSpec:
    n, d = data.x.shape
    # The backends' own loops: bench_fused measures the fused engine.
    document: dict[str, Any] = {
        "data": {"synthetic": {"n_samples": n, "n_features": d}},
        "engine": "loop",
    }
    document.update(fields)
    return JobSpec.model_validate(document)


def snapshot_every(k: int | None) -> OnEpoch:
    """An on_epoch that takes a checkpoint every k epochs (never when k is None)."""

    def on_epoch(record: EpochRecord, snapshot: Callable[[], Checkpoint]) -> None:
        if k is not None and record.epoch % k == 0:
            snapshot()

    return on_epoch


def median_seconds(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each variant, the variants run round-robin."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for run in variants.values():
        run()  # warm-up: first-call costs (imports, allocator, thread pools) are not the engine's
    for _ in range(repeats):
        for name, run in variants.items():
            began = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - began)
    return {name: statistics.median(values) for name, values in times.items()}


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def bench_backends(repeats: int, quick: bool) -> None:
    scale = 10 if quick else 1
    cases = [
        ("tutorial: 1000x3 full batch, 500 epochs", 1000, 3, None, 500 // scale, "float32"),
        ("1000x3 full batch float64, 500 epochs", 1000, 3, None, 500 // scale, "float64"),
        ("20000x20 batch 256, 10 epochs", 20000, 20, 256, 10 // scale or 1, "float32"),
        ("20000x20 batch 32, 2 epochs", 20000, 20, 32, 2, "float32"),
    ]
    devices = ["cpu", "cuda"] if cuda_available() else ["cpu"]
    headers = ["case", "numpy s", *(f"torch-{d} s" for d in devices)]
    headers += [f"torch-{d}/numpy" for d in devices]
    rows = []
    for label, n, d, batch_size, epochs, dtype in cases:
        data = make_data(n, d)
        common: dict[str, Any] = {
            "epochs": epochs,
            "batch_size": batch_size,
            "dtype": dtype,
            "optimizer": {"lr": 1e-4 if batch_size is None else 1e-3},
        }
        variants: dict[str, Callable[[], object]] = {
            "numpy": partial(train, make_spec(data, backend="numpy", **common), data)
        }
        for device in devices:
            spec = make_spec(data, backend="torch", device=device, **common)
            variants[device] = partial(train, spec, data)
        times = median_seconds(variants, repeats)
        rows.append(
            [
                label,
                f"{times['numpy']:.4f}",
                *(f"{times[d]:.4f}" for d in devices),
                *(f"{times[d] / times['numpy']:.2f}" for d in devices),
            ]
        )
    print_table("torch vs numpy (median seconds per run)", headers, rows)


def bench_checkpoints(repeats: int, quick: bool) -> None:
    epochs = 50 if quick else 500
    data = make_data(1000, 3)
    policies: dict[str, int | None] = {"never": None, "every 50": 50, "every epoch": 1}
    headers = ["backend", *(f"{p} s" for p in policies), "every 50/never", "every epoch/never"]
    rows = []
    for backend in ("numpy", "torch"):
        spec = make_spec(data, backend=backend, epochs=epochs, optimizer={"momentum": 0.9})
        variants: dict[str, Callable[[], object]] = {
            name: partial(train, spec, data, on_epoch=snapshot_every(k))
            for name, k in policies.items()
        }
        times = median_seconds(variants, repeats)
        base = times["never"]
        rows.append(
            [
                backend,
                *(f"{times[p]:.4f}" for p in policies),
                f"{times['every 50'] / base:.2f}",
                f"{times['every epoch'] / base:.2f}",
            ]
        )
    print_table(f"checkpoint cost, 1000x3 full batch, {epochs} epochs", headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per variant")
    parser.add_argument("--quick", action="store_true", help="smaller runs, for a smoke test")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        # Small models gain nothing from more threads, and on a busy host they wait on each other.
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}")
    bench_backends(args.repeats, args.quick)
    bench_checkpoints(args.repeats, args.quick)


if __name__ == "__main__":
    main()
