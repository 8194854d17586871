"""The engines against the tutorial's own loops, beside one pass over X and the mini-batch floor.

Run: ``python -m benchmarks.bench_fused [--repeats N] [--device cpu|cuda] [--full-rows N]
[--mini-rows N] [--bandwidth]``. Every
variant of a row runs in the same round, rounds interleaved, and the median is kept, so drift
hits all alike. Prints one markdown table (medians in ms, ratios) and the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.spec import JobSpec
from workers.engines import train
from workers.engines.base import TrainData, batch_slices, epoch_order
from workers.engines.fused import fit_statistics

ROOT = Path(__file__).resolve().parents[1]


def make_data(n: int, d: int = 3, seed: int = 0) -> TrainData:
    """The tutorial's data: y = 1·x1 + 2·x2 + 4·x3 + 3 + 1e-6 noise (d features in general)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = x @ np.arange(1.0, d + 1) + 3 + 1e-6 * rng.normal(size=n)
    return TrainData(x, y)


def make_spec(data: TrainData, **fields: Any) -> JobSpec:
    n, d = data.x.shape
    document: dict[str, Any] = {"data": {"synthetic": {"n_samples": n, "n_features": d}}}
    document.update(fields)
    return JobSpec.model_validate(document)


def tutorial_numpy(data: TrainData, epochs: int, lr: float) -> float:
    """The tutorial's NumPy gradient descent, full batch; returns the last loss."""
    X = np.c_[np.ones(len(data.x)), data.x]
    y, n = data.y, len(data.y)
    p = np.zeros(X.shape[1])
    loss = 0.0
    for _epoch in range(epochs):
        e = X @ p - y
        loss = float(np.mean(e**2))
        p = p - lr * ((2 / n) * X.T @ e)
    return loss


def tutorial_torch(
    data: TrainData, epochs: int, batch_size: int, lr: float, device: str, seed: int
) -> float:
    """nn.Linear + MSELoss + optim.SGD a batch at a time over each epoch's permutation."""
    X = torch.tensor(data.x, dtype=torch.float32, device=device)
    Y = torch.tensor(data.y, dtype=torch.float32, device=device).reshape(-1, 1)
    torch.manual_seed(seed)
    model = nn.Linear(X.shape[1], 1).to(device)
    criterion = nn.MSELoss(reduction="sum")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    n = len(X)
    epoch_loss = 0.0
    for epoch in range(1, epochs + 1):
        perm = torch.from_numpy(epoch_order(n, seed=seed, epoch=epoch, shuffle=True)).to(device)
        epoch_loss = 0.0
        for i in range(0, n, batch_size):
            rows = perm[i : i + batch_size]
            loss = criterion(model(X[rows]), Y[rows])
            epoch_loss += loss.item()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return epoch_loss


def one_pass(x: np.ndarray) -> float:
    """One read of X: ``Xᵀv``."""
    return float((x.T @ np.ones(len(x))).sum())


def minibatch_floor(data: TrainData, epochs: int, batch_size: int, seed: int) -> float:
    """The target shift, then per epoch the permuted gather and every batch's statistics."""
    stats = fit_statistics(data.x, data.y, True, keep_residual=True)
    n = len(data.y)
    rows = np.c_[np.ones(n), data.x, stats.residual]
    total = 0.0
    full = (n // batch_size) * batch_size
    for epoch in range(1, epochs + 1):
        gathered = rows[epoch_order(n, seed=seed, epoch=epoch, shuffle=True)]
        blocks = gathered[:full].reshape(-1, batch_size, rows.shape[1])
        grams = blocks.transpose(0, 2, 1) @ blocks
        total += float(grams[-1, 0, 0])
        if full < n:
            tail = gathered[full:]
            total += float((tail.T @ tail)[0, 0])
    return total


def median_ms(
    variants: dict[str, Callable[[], object]], repeats: dict[str, int]
) -> dict[str, float]:
    """Median wall time of each variant in ms, the variants run round-robin."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for run in variants.values():
        run()  # warm-up: first-call costs (imports, allocator, compiled kernels) are not the run's
    for round_ in range(max(repeats.values())):
        for name, run in variants.items():
            if round_ < repeats[name]:
                began = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - began)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def first_call_seconds(cold: bool) -> float:
    """A fresh process's first fused run (import, kernel load or compilation, run), in s."""
    code = (
        "import time; t = time.perf_counter();"
        "from benchmarks.bench_fused import make_data, make_spec;"
        "from workers.engines import train;"
        "d = make_data(1000); train(make_spec(d, backend='numpy', epochs=5, batch_size=32), d);"
        "train(make_spec(d, backend='numpy', epochs=5), d);"
        "print(time.perf_counter() - t)"
    )
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as cache:
        if cold:
            env["NUMBA_CACHE_DIR"] = cache
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
        )
    return float(out.stdout.strip().splitlines()[-1])


def bandwidth(device: str, n: int, repeats: int) -> str:
    """Bytes per second of the fused statistics pass beside a device-to-device copy of X."""
    from workers.engines.fused_torch import device_statistics

    data = make_data(n)
    where = torch.device(device)
    x = torch.as_tensor(data.x, device=where)
    y = torch.as_tensor(data.y, device=where)

    def synced(action: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            out = action()
            if where.type == "cuda":
                torch.cuda.synchronize()
            return out

        return run

    times = median_ms(
        {
            "statistics": synced(lambda: device_statistics(x, y, data.x, data.y, True)),
            "copy": synced(x.clone),
        },
        {"statistics": repeats, "copy": repeats},
    )
    read = (x.numel() + y.numel()) * 8
    stats_rate = read / (times["statistics"] / 1e3)
    copy_rate = 2 * x.numel() * 8 / (times["copy"] / 1e3)  # read and write
    return (
        f"\nstatistics pass on {device}, n={n:,}: {times['statistics']:.2f} ms, "
        f"{stats_rate / 1e9:.1f} GB/s read; device-to-device copy of X: {times['copy']:.2f} ms, "
        f"{copy_rate / 1e9:.1f} GB/s read+written ({stats_rate / copy_rate:.2f} of the copy's rate)"
    )


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count()
    import numba

    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{model}, {cores} cores{gpu}; Python {platform.python_version()}, numpy {np.__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), numba {numba.__version__}"
    )


def rows_for(args: argparse.Namespace) -> list[list[str]]:
    device, repeats = args.device, args.repeats
    out: list[list[str]] = []
    n_full = args.full_rows
    full = make_data(n_full)
    fields: dict[str, Any] = {
        "backend": "numpy" if device == "cpu" else "torch",
        "device": device,
        "dtype": "float64",
        "model": {"init": "zeros"},
        "loss": {"reduction": "mean"},
        "optimizer": {"lr": 1e-4},
        "epochs": 1000,
    }
    times = median_ms(
        {
            "tutorial": partial(tutorial_numpy, full, 1000, 1e-4),
            "engine": partial(train, make_spec(full, **fields), full),
            "pass": partial(one_pass, full.x),
        },
        {"tutorial": max(1, repeats // 3), "engine": repeats, "pass": 3 * repeats},
    )
    out.append(
        [
            f"full batch, n={n_full:,}, d=3, 1000 epochs (tutorial: NumPy loop)",
            f"{times['tutorial']:.1f}",
            f"{times['engine']:.2f}",
            f"{times['pass']:.2f} (one pass over X)",
            f"{times['tutorial'] / times['engine']:.0f}x",
            f"{times['engine'] / times['pass']:.2f}x",
        ]
    )
    n_mini = args.mini_rows
    mini = make_data(n_mini)
    for batch_size, epochs in ((32, 10), (1, 1), (1024, 10)):
        spec = make_spec(
            mini,
            backend="torch",
            device=device,
            dtype="float32",
            loss={"reduction": "sum"},
            optimizer={"lr": 1e-4},
            epochs=epochs,
            batch_size=batch_size,
            shuffle=True,
        )
        slow = len(list(batch_slices(n_mini, batch_size))) * epochs > 50_000
        times = median_ms(
            {
                "tutorial": partial(tutorial_torch, mini, epochs, batch_size, 1e-4, device, 0),
                "engine": partial(train, spec, mini),
                "floor": partial(minibatch_floor, mini, epochs, batch_size, 0),
            },
            {"tutorial": 1 if slow else max(1, repeats // 3), "engine": repeats, "floor": repeats},
        )
        out.append(
            [
                f"mini-batch {batch_size}, n={n_mini:,}, shuffled, {epochs} epochs "
                "(tutorial: torch nn.Linear + SGD)",
                f"{times['tutorial']:.1f}",
                f"{times['engine']:.2f}",
                f"{times['floor']:.2f} (floor: gather + batch stats)",
                f"{times['tutorial'] / times['engine']:.0f}x",
                f"{times['engine'] / times['floor']:.2f}x",
            ]
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds of the engines")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--full-rows", type=int, default=1_000_000, help="n of the full batch")
    parser.add_argument("--mini-rows", type=int, default=100_000, help="n of the mini-batches")
    parser.add_argument(
        "--bandwidth", action="store_true", help="the statistics pass beside a device copy"
    )
    args = parser.parse_args()
    print(f"machine: {machine()}")
    headers = ["case", "tutorial ms", "lrq ms", "beside ms", "tutorial/lrq", "lrq/beside"]
    rows = rows_for(args)
    print("\n| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.bandwidth:
        print(bandwidth(args.device, args.full_rows, args.repeats))
    if args.device == "cpu":
        cold, warm = first_call_seconds(cold=True), first_call_seconds(cold=False)
        print(
            f"\nfirst fused run in a fresh process: {cold:.2f} s with numba compiling its "
            f"kernels, {warm:.2f} s loading them from its cache (imports included)"
        )


if __name__ == "__main__":
    main()
