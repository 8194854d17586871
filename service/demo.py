"""`lrq demo`: the tutorial's two runs through submit, the queue, a worker and the database."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service import db, dispatch, jobs
from service.settings import Settings
from service.submission import submit

#: The tutorial's runs, as specs (examples/tutorial_torch.yaml and tutorial_numpy.yaml).
TUTORIAL_SPECS: list[dict[str, Any]] = [
    {
        "name": "tutorial-torch",
        "data": {
            "synthetic": {
                "n_samples": 1000,
                "n_features": 3,
                "coefficients": [1, 2, 4],
                "intercept": 3,
                "noise_std": 1.0e-6,
                "generator": "torch",
                "seed": 0,
            },
            "test": {"n_samples": 1000, "seed": 1},
        },
        "backend": "torch",
        "model": {"fit_intercept": True, "init": "default"},
        "loss": {"reduction": "sum"},
        "optimizer": {"lr": 1.0e-4},
        "epochs": 500,
        "batch_size": None,
        "seed": 0,
        "dtype": "float32",
    },
    {
        "name": "tutorial-numpy",
        "data": {
            "synthetic": {
                "n_samples": 100,
                "n_features": 3,
                "coefficients": [1, 2, 4],
                "intercept": 3,
                "noise_std": 1.0e-6,
                "generator": "numpy",
                "seed": 0,
            }
        },
        "backend": "numpy",
        "model": {"fit_intercept": True, "init": "zeros"},
        "loss": {"reduction": "mean"},
        "optimizer": {"lr": 1.0e-4},
        "epochs": 1000,
        "batch_size": None,
        "seed": 0,
        "dtype": "float64",
    },
]


def run_demo(home: Path, *, echo: Callable[[str], Any], timeout: float = 600.0) -> int:
    """Submit the tutorial's jobs to a worker running in this process; 0 if both succeed."""
    from celery.contrib.testing.worker import start_worker

    from service.queue import make_app
    from workers.tasks import register_tasks

    settings = Settings(home=home, database_url="", broker_url="")
    url = settings.resolved_database_url()
    db.upgrade(url)
    app = make_app(settings)
    register_tasks(app, settings, reconcile=False)
    echo(f"database {db.mask_url(url)}; broker {settings.resolved_broker_url()} in {home}")
    with db.transaction(url) as session:
        created = []
        for document in TUTORIAL_SPECS:
            created += submit(
                document, overrides=(), grid=(), queue=None, settings=settings, session=session
            ).jobs
        pairs = [(job.id, job.queue) for job in created]
    dispatch.publish_jobs(app, settings, pairs)
    for job_id, queue in pairs:
        echo(f"submitted {job_id} to the {queue} queue")
    ids = [job_id for job_id, _ in pairs]
    with start_worker(
        app,
        pool="solo",
        perform_ping_check=False,
        loglevel="WARNING",
        queues=["cpu"],
        shutdown_timeout=30,
    ):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with db.transaction(url) as session:
                found = jobs.find_jobs(session=session, ids=ids)
            if all(job.state not in ("queued", "running") for job in found):
                break
            time.sleep(0.2)
    with db.transaction(url) as session:
        found = jobs.find_jobs(session=session, ids=ids)
        history = jobs.history_frame(ids, session=session)
    for job in found:
        result = job.result or {}
        losses = history[history.job_id == job.id].train_loss.tolist()
        echo(f"\n{job.name} ({job.id[:12]}): {job.state}, {job.epochs_done} epochs")
        if losses:
            marks = sorted({0, 9, 49, 99, len(losses) - 1} & set(range(len(losses))))
            echo("  loss by epoch: " + ", ".join(f"{i + 1}: {losses[i]:.4g}" for i in marks))
        if result:
            weights = ", ".join(f"{w:.6f}" for w in result["weights"])
            echo(f"  weights [{weights}]  bias {result['bias']:.6f}")
            echo(
                f"  least-squares optimum loss {result['optimum_loss']:.4g}, "
                f"gap {result['optimum_gap']:.3g}"
            )
            if result.get("test_loss") is not None:
                echo(f"  test loss on a fresh draw {result['test_loss']:.4g}")
        if job.error:
            echo(f"  error: {job.error}")
    echo(f"\ninspect with: LRQ_HOME={home} lrq status")
    return 0 if all(job.state == "succeeded" for job in found) else 1
