"""Results and histories of many jobs as pandas DataFrames, straight from the database."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pandas as pd

from service import db
from service.jobs import find_jobs, history_frame, resolve_sweep, results_frame
from tests.support import WorkerProcess, run_cli, wait_jobs

ROOT = Path(__file__).resolve().parents[2]
SWEEP_SPEC = str(ROOT / "examples" / "sweep.yaml")
LRS = (1e-3, 5e-3, 1e-2)
BATCHES = (64, 256)
EPOCHS = 6


def test_results_and_histories_of_a_sweep(lrq_env: dict[str, str], tmp_path: Path) -> None:
    url = lrq_env["LRQ_DATABASE_URL"]
    lrs, batches = ",".join(map(str, LRS)), ",".join(map(str, BATCHES))
    grid = ("--grid", f"optimizer.lr={lrs}", "--grid", f"batch_size={batches}")
    process = WorkerProcess(lrq_env, tmp_path / "worker.log").wait_ready()
    try:
        submitted = run_cli("submit", SWEEP_SPEC, "--set", f"epochs={EPOCHS}", *grid)
        assert submitted.exit_code == 0, submitted.output
        sweep_ref = submitted.stdout.split()[1]
        ids = [line.split()[0] for line in submitted.stdout.splitlines()[1:]]
        wait_jobs(url, ids, timeout=60, workers=[process])
    finally:
        process.stop()

    with db.transaction(url) as session:
        jobs = find_jobs(session=session, sweep_id=resolve_sweep(sweep_ref[:8], session=session))
        results = results_frame(jobs)
        history = history_frame([job.id for job in jobs], session=session)
        empty = history_frame([], session=session)

    # One row per job: the spec's parameters as columns beside the summary.
    assert len(results) == len(LRS) * len(BATCHES)
    assert sorted(results["id"]) == sorted(ids)
    assert set(results["state"]) == {"succeeded"}
    assert (results["epochs_done"] == EPOCHS).all()
    points = set(zip(results["spec.optimizer.lr"], results["spec.batch_size"], strict=True))
    assert points == set(itertools.product(LRS, BATCHES))
    assert (results["spec.data.synthetic.n_samples"] == 2000).all()
    assert results["weights"].map(len).eq(4).all()
    assert results["train_loss"].dtype == "float64" and results["train_loss"].notna().all()

    # Every epoch of every job, fetched at once, in long format.
    assert list(history.columns) == ["job_id", "epoch", "train_loss", "test_loss", "seconds"]
    assert len(history) == len(ids) * EPOCHS
    assert not history.duplicated(["job_id", "epoch"]).any()
    epochs = history.groupby("job_id")["epoch"].apply(list)
    assert epochs.to_dict() == {job_id: list(range(1, EPOCHS + 1)) for job_id in ids}
    assert history[["train_loss", "test_loss", "seconds"]].notna().all().all()
    assert list(empty.columns) == list(history.columns) and empty.empty

    # The frames join: the last epoch's loss is each job's reported train loss.
    last = history[history["epoch"] == EPOCHS].merge(results, left_on="job_id", right_on="id")
    assert (last["train_loss_x"] == last["train_loss_y"]).all()
    wide = history.pivot(index="epoch", columns="job_id", values="train_loss")
    assert wide.shape == (EPOCHS, len(ids))
    by_lr = results.groupby("spec.optimizer.lr")["test_loss"].min()
    assert list(by_lr.index) == sorted(LRS)

    # The CLI's JSON export is the same numbers.
    exported = run_cli("results", "--sweep", sweep_ref, "--history", "--format", "json")
    assert exported.exit_code == 0, exported.output
    from_cli = pd.DataFrame(json.loads(exported.stdout))
    pd.testing.assert_frame_equal(from_cli, history.reset_index(drop=True))
