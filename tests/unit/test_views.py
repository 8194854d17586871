"""The pure parts of the views: sparklines, plain lines, pace, grid positions, point rows."""

from __future__ import annotations

import datetime as dt
import math
import random

from service.models import Job, Sweep
from service.sweeps import grid_position, point_rows
from service.views import SPARK, live_table, pace, plain_lines, sparkline

NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


def job(index: int, **fields: object) -> Job:
    values: dict[str, object] = {
        "id": f"{index:032x}",
        "name": f"job{index}",
        "state": "queued",
        "epochs_done": 0,
        "epochs_total": 100,
        "spec": {},
        "created_at": NOW,
    }
    values.update(fields)
    return Job(**values)


def test_sparkline_spans_the_blocks_and_is_log_scaled() -> None:
    losses = [10.0 ** -(i / 10) for i in range(50)]  # log-linear: evenly spaced levels
    line = sparkline(losses, width=50)
    assert len(line) == 50 and line[0] == SPARK[-1] and line[-1] == SPARK[0]
    levels = [SPARK.index(c) for c in line]
    assert levels == sorted(levels, reverse=True)
    assert len(sparkline(losses * 10, width=40)) == 40
    assert sparkline([math.nan, 1.0, math.inf]) == " ▁ "
    assert sparkline([]) == ""
    rising = sparkline([-1.0, 0.0, 1.0])  # a non-positive value: linear scale
    assert rising == SPARK[0] + SPARK[4] + SPARK[-1]


def test_pace_from_the_epochs_done_since_start() -> None:
    rng = random.Random()
    done, seconds = rng.randint(1, 99), rng.uniform(1, 100)
    running = job(
        1, state="running", epochs_done=done, started_at=NOW - dt.timedelta(seconds=seconds)
    )
    speed = pace(running, NOW)
    assert speed.rate is not None and math.isclose(speed.rate, done / seconds, rel_tol=1e-6)
    assert speed.seconds_left is not None
    assert math.isclose(speed.seconds_left, (100 - done) * seconds / done, rel_tol=1e-6)
    assert pace(job(2), NOW).rate is None


def test_plain_lines_only_for_changes() -> None:
    seen: dict[str, tuple[str, int]] = {}
    jobs = [job(1), job(2)]
    assert len(plain_lines(jobs, seen, NOW)) == 2
    assert plain_lines(jobs, seen, NOW) == []
    jobs[1].state, jobs[1].epochs_done, jobs[1].last_loss = "running", 5, 0.5
    [line] = plain_lines(jobs, seen, NOW)
    assert line.split()[1:] == [jobs[1].id[:12], "running", "5/100", "loss", "0.5"]


def test_live_table_fits_its_height_and_counts_the_rest() -> None:
    from rich.console import Console

    jobs = [
        job(i, state="running" if i < 3 else "queued", epochs_done=10 * (i < 3)) for i in range(30)
    ]
    console = Console(width=160, height=20, record=True, force_terminal=False)
    console.print(live_table(jobs, height=20, left_out=5, now=NOW))
    text = console.export_text()
    assert len(text.splitlines()) <= 20
    assert "... and 21 more job(s)" in text  # 14 rows fit of 30, plus 5 left out by the limit
    assert "27 queued, 3 running" in text


def test_grid_position_and_best_point() -> None:
    sweep = Sweep(
        id="s" * 32, name="s", spec={}, grid=["optimizer.lr=0.1,0.01", "batch_size=null,8"]
    )
    specs = [(lr, batch) for lr in (0.1, 0.01) for batch in (None, 8)]
    jobs = [
        job(i, spec={"optimizer": {"lr": lr}, "batch_size": batch}, state="succeeded",
            result={"train_loss": 1.0 + i, "test_loss": 4.0 - i})
        for i, (lr, batch) in enumerate(specs)
    ]  # fmt: skip
    assert [grid_position(sweep, j) for j in jobs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # A value no longer in the spec is found from the label in the job's name.
    renamed = job(9, name="s[lr=0.01,batch_size=8]", spec={"optimizer": {}})
    assert grid_position(sweep, renamed) == (1, 1)
    rows = point_rows(sweep, list(reversed(jobs)))
    assert [r["best"] for r in rows] == [True, False, False, False]  # lowest test loss
    ranked = point_rows(sweep, jobs, sort="train_loss")
    assert [r["train_loss"] for r in ranked] == [1.0, 2.0, 3.0, 4.0]
    assert [r["best"] for r in ranked] == [True, False, False, False]  # by the sort metric
