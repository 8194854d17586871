"""A 64-point learning-rate sweep packed, against one of its jobs alone and all 64 one by one.

Run: ``python -m benchmarks.bench_pack [--repeats N] [--points N] [--quick] [--queue]
[--device cpu|cuda]``. With ``--device`` the pack runs as stacked tensors on that torch device
and each job alone on the fused engine's torch code there (the CUDA path).
In-process: ``train_pack`` over the sweep against ``train`` of each point, on the same data,
full batch and mini-batch (batch 32). With ``--queue`` also through the queue: a private
redis-server, SQLite and one real ``lrq worker`` (warmed by a one-epoch job first), timed from
``lrq submit --grid … --wait`` to its exit, packed, ``--no-pack``, and one job of the sweep
alone. Every variant of a row is timed in the same round, rounds interleaved, and the median
kept, so drift hits all alike.
Each packed member is checked equal to its solo run before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from service.spec import JobSpec
from workers.engines import train
from workers.engines.base import TrainData
from workers.engines.pack import Member, train_pack


def make_data(n: int, d: int) -> TrainData:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d))
    y = x @ np.arange(1.0, d + 1) + 3 + 0.1 * rng.normal(size=n)
    return TrainData(x, y)


def sweep(data: TrainData, points: int, **fields: Any) -> list[JobSpec]:
    n, d = data.x.shape
    # Every point converges (a diverging one spends its time finding where, alone or packed).
    return [
        JobSpec.model_validate(
            {
                "data": {"synthetic": {"n_samples": n, "n_features": d}},
                "optimizer": {"lr": lr},
                "loss": {"reduction": "mean"},
                "dtype": "float64",
                **fields,
            }
        )
        for lr in np.geomspace(1e-3, 0.3, points).tolist()
    ]


def alone(spec: JobSpec, data: TrainData, device: str | None) -> Any:
    if device is None:
        return train(spec, data)
    import torch

    from workers.engines.epochs import run_epochs
    from workers.engines.fused_torch import TorchFusedEngine

    engine = TorchFusedEngine(spec, data, device=torch.device(device))
    return run_epochs(
        spec,
        data,
        engine,
        on_epoch=None,
        should_stop=None,
        resume=None,
        chunk_epochs=50,
        chunk_seconds=2.0,
    )


def solo(spec: JobSpec, data: TrainData, device: str | None) -> Callable[[], Any]:
    return lambda: alone(spec, data, device)


def run_packed(specs: list[JobSpec], data: TrainData, device: str | None) -> Any:
    where = None
    if device is not None:
        import torch

        where = torch.device(device)
    members = [Member(str(i), s) for i, s in enumerate(specs)]
    return train_pack(members, data, chunk_epochs=50, chunk_seconds=2.0, device=where)


def packed(specs: list[JobSpec], data: TrainData, device: str | None) -> Callable[[], Any]:
    return lambda: run_packed(specs, data, device)


def one_by_one(specs: list[JobSpec], data: TrainData, device: str | None) -> Callable[[], Any]:
    return lambda: [alone(s, data, device) for s in specs]


def check(specs: list[JobSpec], data: TrainData, device: str | None) -> None:
    """Each packed member's history is its solo run's: the same bits on the compiled kernels,
    within 1e-12 relative on a torch device (batched products round differently)."""
    result = run_packed(specs, data, device)
    for i, spec in enumerate(specs):
        mine, theirs = result.results[str(i)].losses, alone(spec, data, device).losses
        same = mine == theirs if device is None else np.allclose(mine, theirs, rtol=1e-12, atol=0)
        if not same:
            raise SystemExit(f"point {i}: the packed history differs from the solo run")


def timed(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            began = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - began)
    return {name: statistics.median(values) for name, values in seconds.items()}


ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def queue_seconds(spec: dict[str, Any], grid: str, *options: str) -> float:
    """Seconds from ``lrq submit`` to the last job finished, with Redis, SQLite, one worker."""
    home = Path(tempfile.mkdtemp(prefix="lrq-bench-pack-"))
    port = _free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "LRQ_HOME": str(home),
        "LRQ_DATA_DIR": str(home),
        "LRQ_BROKER_URL": f"redis://127.0.0.1:{port}/0",
        "LRQ_DATABASE_URL": f"sqlite:///{home / 'lrq.db'}",
    }
    lrq = [sys.executable, "-m", "service.cli"]
    path = home / "spec.json"
    path.write_text(json.dumps(spec))
    subprocess.run([*lrq, "db", "upgrade"], env=env, check=True, capture_output=True)
    log_path = home / "worker.log"
    log = log_path.open("wb")
    worker = subprocess.Popen(
        [*lrq, "worker", "--concurrency=1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        while b" ready." not in log_path.read_bytes():
            time.sleep(0.05)
        # Warm the pool process (torch, numba's cached kernels, connections) with one epoch.
        warm = home / "warm.json"
        warm.write_text(json.dumps({**spec, "epochs": 1}))
        subprocess.run(
            [*lrq, "submit", str(warm), "--wait", "-q"], env=env, check=True, capture_output=True
        )
        began = time.perf_counter()
        command = [*lrq, "submit", str(path), "--wait", "-q", *options]
        if grid:
            command += ["--grid", grid]
        subprocess.run(command, env=env, check=True, capture_output=True)
        return time.perf_counter() - began
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        log.close()
        os.killpg(redis.pid, signal.SIGKILL)
        redis.wait()
        shutil.rmtree(home, ignore_errors=True)


def queue_rows(points: int, repeats: int, rows: int) -> None:
    lrs = np.geomspace(1e-3, 0.3, points).tolist()
    grid = "optimizer.lr=" + ",".join(repr(lr) for lr in lrs)
    cases = [
        ("full batch", {"epochs": 100}, 1.5),
        ("mini-batch 32", {"epochs": 10, "batch_size": 32}, 4.0),
    ]
    print(
        f"\n{points}-point lr sweep through the queue (Redis, SQLite, one worker), n = {rows:,},"
        f" medians of {repeats}"
    )
    print("| case | one job | packed sweep | --no-pack | packed / one | target |")
    print("|---|---|---|---|---|---|")
    for label, fields, target in cases:
        spec = {
            "name": "bench-pack",
            "data": {"synthetic": {"n_samples": rows, "n_features": 3, "noise_std": 0.1}},
            "backend": "numpy",
            "device": "cpu",
            "loss": {"reduction": "mean"},
            "optimizer": {"lr": lrs[-1]},
            "dtype": "float64",
            **fields,
        }
        medians = timed(
            {
                "one": lambda s=spec: queue_seconds(s, ""),
                "packed": lambda s=spec: queue_seconds(s, grid),
                "each": lambda s=spec: queue_seconds(s, grid, "--no-pack"),
            },
            repeats,
        )
        ratio = medians["packed"] / medians["one"]
        print(
            f"| {label} | {medians['one']:.2f} s | {medians['packed']:.2f} s "
            f"| {medians['each']:.2f} s | {ratio:.2f}x "
            f"| <= {target:g}x {'met' if ratio <= target else 'missed'} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--points", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="smaller data, fewer repeats")
    parser.add_argument("--queue", action="store_true", help="also through Redis and a worker")
    parser.add_argument("--device", help="a torch device (cuda, cpu): the device pack")
    args = parser.parse_args()
    device = args.device
    full_rows, mini_rows = (100_000, 10_000) if args.quick else (1_000_000, 100_000)
    repeats = 2 if args.quick else args.repeats
    rows = [
        ("full batch", make_data(full_rows, 3), {"epochs": 100}, (1.5,)),
        ("mini-batch 32", make_data(mini_rows, 3), {"epochs": 10, "batch_size": 32}, (4.0,)),
    ]
    where = "compiled CPU kernels" if device is None else f"torch on {device}"
    print(f"{args.points}-point lr sweep, in-process ({where}), medians of {repeats}")
    print("| case | n | epochs | one job | packed sweep | one by one | packed / one | target |")
    print("|---|---|---|---|---|---|---|---|")
    for label, data, fields, (target,) in rows:
        specs = sweep(data, args.points, **fields)
        check(specs, data, device)
        medians = timed(
            {
                "one": solo(specs[-1], data, device),
                "packed": packed(specs, data, device),
                "each": one_by_one(specs, data, device),
            },
            repeats,
        )
        ratio = medians["packed"] / medians["one"]
        print(
            f"| {label} | {len(data.y):,} | {fields['epochs']} | {medians['one'] * 1e3:.1f} ms "
            f"| {medians['packed'] * 1e3:.1f} ms | {medians['each'] * 1e3:.1f} ms "
            f"| {ratio:.2f}x | <= {target:g}x {'met' if ratio <= target else 'missed'} |"
        )
    if args.queue:
        queue_rows(args.points, repeats, 10_000 if args.quick else 100_000)


if __name__ == "__main__":
    main()
