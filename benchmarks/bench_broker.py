"""How fast a worker on the no-server (filesystem) broker gets through a sweep of tiny jobs.

`python -m benchmarks.bench_broker [--jobs N] [--repeats N]`

Side by side and interleaved: a real `lrq worker` polling the broker's folder every
``service.queue.FILESYSTEM_POLL_SECONDS`` (lrq's setting), and one polling at kombu's default
of once a second, each working through the same N one-epoch jobs submitted at once (with
``--no-pack``, so that each job is a message of its own: a packed sweep is one). It prints
the median seconds per sweep, the jobs per second and their ratio; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KOMBU_DEFAULT_POLL_SECONDS = 1.0
TINY = {
    "name": "tiny",
    "data": {"synthetic": {"n_samples": 40, "n_features": 2, "coefficients": [1, 2], "seed": 1}},
    "backend": "numpy",
    "optimizer": {"lr": 0.001},
    "epochs": 1,
    "batch_size": 10,
}


def sweep_seconds(poll: float, jobs: int) -> float:
    """Seconds from submitting ``jobs`` tiny jobs to the last one finished, one worker."""
    home = Path(tempfile.mkdtemp(prefix="lrq-bench-broker-"))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "LRQ_HOME": str(home),
        "LRQ_DATA_DIR": str(home),
        "LRQ_BROKER_URL": "",
        "LRQ_DATABASE_URL": "",
    }
    lrq = [sys.executable, "-m", "service.cli"]
    spec = home / "tiny.json"
    spec.write_text(json.dumps(TINY))
    subprocess.run([*lrq, "db", "upgrade"], env=env, check=True, capture_output=True)
    log = (home / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_broker", "--worker", str(poll)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        while b" ready." not in (home / "worker.log").read_bytes():
            time.sleep(0.05)
        seeds = ",".join(str(seed) for seed in range(jobs))
        began = time.perf_counter()
        subprocess.run(
            [*lrq, "submit", str(spec), "--grid", f"seed={seeds}", "--no-pack", "--wait", "-q"],
            env=env,
            check=True,
            capture_output=True,
        )
        return time.perf_counter() - began
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        log.close()
        shutil.rmtree(home, ignore_errors=True)


def run_worker(poll: float) -> None:
    """`lrq worker` with the filesystem broker polled every ``poll`` seconds."""
    from service import queue
    from service.cli import main

    queue.FILESYSTEM_POLL_SECONDS = poll
    main(args=["worker", "--concurrency=1"], prog_name="lrq")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        run_worker(args.worker)
        return
    from service.queue import FILESYSTEM_POLL_SECONDS

    polls = {"lrq": FILESYSTEM_POLL_SECONDS, "kombu default": KOMBU_DEFAULT_POLL_SECONDS}
    times: dict[str, list[float]] = {name: [] for name in polls}
    for repeat in range(args.repeats):
        order = list(polls) if repeat % 2 == 0 else list(reversed(polls))
        for name in order:
            times[name].append(sweep_seconds(polls[name], args.jobs))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, poll in polls.items():
        print(
            f"{name:>14} (poll every {poll:g}s): {medians[name]:.2f}s for {args.jobs} jobs, "
            f"{args.jobs / medians[name]:.1f} jobs/s"
        )
    print(f"speed-up: {medians['kombu default'] / medians['lrq']:.1f}x")


if __name__ == "__main__":
    main()
