"""`lrq status` start-up beside `python -c "import click, sqlalchemy"`.

`python -m benchmarks.bench_startup [--repeats N]`

Each repeat runs both as fresh interpreters, alternating which goes first: the bare import
line, and `lrq status` (via ``service.cli.main``) on a migrated, empty SQLite database with
no LRQ_* variables but a home. It prints the medians and their ratio; it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BARE = [sys.executable, "-c", "import click, sqlalchemy"]
STATUS = [sys.executable, "-c", "from service.cli import main; main()", "status"]


def timed(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LRQ_")}
        env.update(
            LRQ_HOME=home, PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        )
        migrate = [sys.executable, "-c", "from service.cli import main; main()", "db", "upgrade"]
        subprocess.run(migrate, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        timed(STATUS, env)  # warm the file cache and byte-code
        seconds: dict[str, list[float]] = {"bare": [], "status": []}
        for repeat in range(args.repeats):
            pair = [("bare", BARE), ("status", STATUS)]
            for name, command in pair if repeat % 2 == 0 else pair[::-1]:
                seconds[name].append(timed(command, env))
    bare, status = (statistics.median(seconds[k]) for k in ("bare", "status"))
    print(f"start-up, median of {args.repeats}:")
    print(f"  python -c 'import click, sqlalchemy'  {bare:.3f} s")
    print(f"  lrq status (empty SQLite)             {status:.3f} s")
    print(f"  ratio                                 {status / bare:.2f}")


if __name__ == "__main__":
    main()
