"""The queue: N small jobs from submit to every result stored, beside bare Celery no-ops.

`python -m benchmarks.bench_queue [--jobs N] [--repeats N] [--no-task-events]`

Both sides run in the same process tree against one redis-server of the benchmark's own
(a free port) with the same worker settings: late acks, prefetch 1, two prefork processes,
fair scheduling, no gossip or mingle. lrq's side: ``lrq submit --grid`` of N tiny numpy jobs
(32 rows, 5 epochs) into a fresh PostgreSQL database, one ``lrq worker --concurrency 2``,
timed from the submit command's start until the database holds every job finished, with
``--no-pack`` (a message, a claim and a finish per job) and packed (the default for a grid:
a worker claims up to ``LRQ_PACK_MAX_MEMBERS`` jobs of the sweep and trains them at once;
each is still claimed, recorded and finished as its own row, in the pack's transactions). Celery's
side: N no-op tasks sent in a loop, timed until the last one ran (each INCRs a counter). The
repeats alternate the two; it prints the medians and lrq's share of Celery's throughput.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.services import postgres_database, redis_server, wait_until

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "from service.cli import main; main()"]
SPEC = ROOT / "examples" / "tutorial_numpy.yaml"
TINY = ("--set", "data.synthetic.n_samples=32", "--set", "epochs=5")
#: The celery worker's settings on both sides (lrq's workers/pool.py passes the same).
WORKER_FLAGS = ("--concurrency=2", "--without-gossip", "--without-mingle", "--optimization=fair")

NOOP_APP = """
import os
import redis
from celery import Celery

app = Celery("noop", broker=os.environ["NOOP_BROKER"], set_as_current=False)
app.conf.update(
    task_serializer="json", accept_content=["json"], task_ignore_result=True,
    task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
    task_default_queue="noop", worker_hijack_root_logger=False,
)
counter = redis.Redis.from_url(os.environ["NOOP_BROKER"])

@app.task(name="noop")
def noop(i):
    counter.incr("noop-done")
"""


@contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        child = subprocess.Popen(args, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield child
        finally:
            child.terminate()
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(10)


def finished_count(url: str, ids: list[str]) -> int:
    from sqlalchemy import func, select

    from service import db
    from service.models import TERMINAL, Job

    with db.transaction(url) as session:
        return int(
            session.scalar(select(func.count()).where(Job.id.in_(ids) & Job.state.in_(TERMINAL)))
            or 0
        )


def lrq_submit(count: int, env: dict[str, str], pack: bool) -> list[str]:
    seeds = ",".join(str(seed) for seed in range(1, count + 1))
    args = [*CLI, "submit", str(SPEC), *TINY, "--grid", f"seed={seeds}", "-q"]
    args.append("--pack" if pack else "--no-pack")
    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"lrq submit failed: {done.stderr.strip()}")
    return [line for line in done.stdout.splitlines() if line and not line.startswith("#")]


def lrq_run(count: int, env: dict[str, str], url: str, pack: bool) -> float:
    """Seconds from the submit command's start until every job is finished in the database."""
    start = time.perf_counter()
    ids = lrq_submit(count, env, pack)
    if len(ids) != count:
        raise RuntimeError(f"submitted {len(ids)} jobs, expected {count}")
    wait_until(lambda: finished_count(url, ids) == count, timeout=600, what="lrq jobs", every=0.05)
    return time.perf_counter() - start


def celery_run(count: int, broker: str) -> float:
    """Seconds from the first no-op sent until the last one ran."""
    import redis
    from celery import Celery

    counter = redis.Redis.from_url(broker)
    counter.set("noop-done", 0)
    app = Celery("noop", broker=broker, set_as_current=False)
    app.conf.update(task_serializer="json", task_default_queue="noop")
    start = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for i in range(count):
            app.send_task("noop", args=[i], queue="noop", producer=producer)
    wait_until(
        lambda: int(counter.get("noop-done") or 0) >= count, timeout=600, what="celery no-ops"
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-task-events", action="store_true", help="Run lrq's worker with LRQ_TASK_EVENTS=0."
    )
    parser.add_argument("--loglevel", default="WARNING", help="lrq worker's log level.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        (work / "noop_app.py").write_text(NOOP_APP)
        with redis_server(work) as broker, postgres_database() as url:
            env = {k: v for k, v in os.environ.items() if not k.startswith("LRQ_")}
            env.update(
                LRQ_HOME=str(work / "home"),
                LRQ_DATABASE_URL=url,
                LRQ_BROKER_URL=broker,
                PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
                NOOP_BROKER=broker,
            )
            if args.no_task_events:
                env["LRQ_TASK_EVENTS"] = "0"
            noop_env = {**env, "PYTHONPATH": str(work)}
            celery = [sys.executable, "-m", "celery", "-A", "noop_app", "worker", "-Q", "noop"]
            lrq_worker = [*CLI, "worker", "--queues", "cpu", "--concurrency", "2"]
            with (
                process([*celery, *WORKER_FLAGS, "--loglevel=WARNING"], noop_env, work / "c.log"),
                process([*lrq_worker, "--loglevel", args.loglevel], env, work / "w.log"),
            ):
                # Warm both: pool processes forked, imports done, connections open.
                lrq_run(20, env, url, pack=False)
                lrq_run(20, env, url, pack=True)
                celery_run(20, broker)
                kinds = ["lrq --no-pack", "celery", "lrq --pack"]
                seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
                for repeat in range(args.repeats):
                    order = kinds if repeat % 2 == 0 else kinds[::-1]
                    for kind in order:
                        if kind == "celery":
                            seconds[kind].append(celery_run(args.jobs, broker))
                        else:
                            packed = kind == "lrq --pack"
                            seconds[kind].append(lrq_run(args.jobs, env, url, packed))
    print(f"queue: {args.jobs} small jobs, {args.repeats} repeats, 2 prefork processes")
    rate = {kind: args.jobs / statistics.median(values) for kind, values in seconds.items()}
    for kind, values in seconds.items():
        print(f"  {kind:14s} median {statistics.median(values):7.2f} s  {rate[kind]:8.1f} jobs/s")
    for kind in kinds:
        if kind != "celery":
            target = "target >= 200%" if kind == "lrq --pack" else "target >= 25%"
            share = rate[kind] / rate["celery"]
            print(f"  {kind} / bare celery throughput: {share:.1%} ({target})")


if __name__ == "__main__":
    main()
