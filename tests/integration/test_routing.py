"""`device: auto`: the gpu queue when a live GPU worker exists and a step's batch is large
enough, else the cpu queue."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import WorkerProcess, load_jobs, run_cli, set_lrq_env, submit_ids, wait_jobs

ROOT = Path(__file__).resolve().parents[2]
SWEEP_SPEC = str(ROOT / "examples" / "sweep.yaml")

#: A real Celery worker on the gpu queue without CUDA (`lrq worker` refuses that): jobs with
#: ``device: auto`` run on its CPU, which is all routing needs.
GPU_QUEUE_WORKER = """
import sys
from service.queue import make_app
from service.settings import get_settings
from workers.tasks import register_tasks
app = make_app(get_settings())
register_tasks(app, get_settings(), torch_threads=1)
options = [a.replace("--name=", "--hostname=") for a in sys.argv[1:]]
app.worker_main(["worker", *options, "--without-gossip", "--without-mingle"])
"""


def test_auto_goes_to_a_live_gpu_worker_only_when_large_enough(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_url: str
) -> None:
    from service import db

    url = f"sqlite:///{tmp_path / 'lrq.db'}"
    db.upgrade(url)
    # 1500 training rows x 4 features: full batch is 6000 values, a batch of 128 is 512.
    values = set_lrq_env(
        monkeypatch,
        tmp_path,
        database_url=url,
        broker_url=redis_url,
        auto_gpu_min_batch_elements="6000",
    )
    env = {**os.environ, **values, "PYTHONPATH": str(ROOT)}
    torch_auto = ("--set", "backend=torch", "--set", "device=auto", "--set", "epochs=3")
    big = (*torch_auto, "--set", "batch_size=null")
    small = (*torch_auto, "--set", "batch_size=128")

    def queue_of(*args: str) -> str:
        [job_id] = submit_ids(SWEEP_SPEC, *args)
        [job] = load_jobs(url, [job_id])
        return str(job.queue)

    assert queue_of(*big) == "cpu"  # no GPU worker is up
    name = f"gpu0@{socket.gethostname()}"
    command = [sys.executable, "-c", GPU_QUEUE_WORKER]
    worker = WorkerProcess(env, tmp_path / "gpu.log", queues="gpu", name=name, command=command)
    try:
        worker.wait_ready()
        assert queue_of(*big) == "gpu"
        assert queue_of(*small) == "cpu"  # 512 values a step: the CPU is faster
        assert queue_of(*big, "--set", "backend=numpy") == "cpu"  # numpy runs on the CPU only
        assert queue_of(*big, "--queue", "cpu") == "cpu"  # an explicit queue wins
        [on_gpu] = [j.id for j in load_jobs(url) if j.queue == "gpu"]
        [done] = wait_jobs(url, [on_gpu], timeout=120, workers=[worker])
        assert (done.state, done.epochs_done) == ("succeeded", 3)
        assert done.result["device"] == "cpu"  # auto without CUDA trains on the CPU
        info = run_cli("info").stdout
        assert f"  {name}  host {socket.gethostname()}  queues gpu" in info
        as_process = subprocess.run(
            [sys.executable, "-m", "service.cli", "info"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert as_process.returncode == 0, as_process.stderr
        assert f"  {name}  host {socket.gethostname()}  queues gpu  gpus all visible" in (
            as_process.stdout
        )
    finally:
        worker.stop()
