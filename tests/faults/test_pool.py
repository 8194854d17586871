"""The GPU pool's supervisor on the CPU: stand-in worker processes are pinned, named, restarted
when killed, given up on when they keep dying, and all stopped by one SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.support import wait_for

ROOT = Path(__file__).resolve().parents[2]

#: A stand-in for `lrq worker`: says who it is and what it sees, then waits for SIGTERM.
STAND_IN = """
import os, signal, sys, time
name = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--name="))
log = sys.argv[1]
def write(text):
    with open(log, "a") as f:
        f.write(text + "\\n")
def stop(*_):
    write(f"stopped {name} {os.getpid()}")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
if os.environ.get("STAND_IN_DIES"):
    sys.exit(3)
write(f"started {name} {os.environ['CUDA_VISIBLE_DEVICES']} {os.getpid()} {' '.join(sys.argv[2:])}")
while True:
    time.sleep(0.1)
"""

#: The supervisor as `lrq worker --gpus 0,1,3` runs it, with the stand-in and four "devices".
SUPERVISOR = """
import sys
from workers.pool import Backoff, run_gpu_pool
stand_in, log = sys.argv[1], sys.argv[2]
sys.exit(run_gpu_pool(
    [0, 1, 3], queues=["gpu"], loglevel="INFO", command=[sys.executable, stand_in, log],
    device_count=4, backoff=Backoff(first=0.2, longest=1.0, fast=5.0, give_up_after=3),
))
"""


def start_pool(tmp_path: Path, **env: str) -> tuple[subprocess.Popen[str], Path]:
    stand_in = tmp_path / "stand_in.py"
    stand_in.write_text(STAND_IN)
    log = tmp_path / "children.log"
    log.touch()
    environment = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="4,5,6,7", **env)
    pool = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, str(stand_in), str(log)],
        env=environment,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    return pool, log


def started(log: Path) -> dict[str, list[tuple[str, int, str]]]:
    """Per worker name, each start: (device seen, pid, the worker options)."""
    out: dict[str, list[tuple[str, int, str]]] = {}
    for line in log.read_text().splitlines():
        if line.startswith("started "):
            _, name, device, pid, options = line.split(" ", 4)
            out.setdefault(name, []).append((device, int(pid), options))
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes: read its state.
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def test_supervisor_restarts_a_killed_worker_and_stops_all_on_sigterm(tmp_path: Path) -> None:
    pool, log = start_pool(tmp_path)
    host = socket.gethostname()
    names = [f"gpu0@{host}", f"gpu1@{host}", f"gpu3@{host}"]
    try:
        first = wait_for(
            lambda: (s := started(log)) and len(s) == 3 and s, timeout=60, what="three workers"
        )
        assert sorted(first) == sorted(names)
        # Indices count within CUDA_VISIBLE_DEVICES=4,5,6,7: GPU 3 is device 7.
        assert {name: starts[0][0] for name, starts in first.items()} == dict(
            zip(names, ["4", "5", "7"], strict=True)
        )
        assert (
            first[names[2]][0][2]
            == f"--queues=gpu --concurrency=1 --name={names[2]} --loglevel=INFO"
        )

        victim = first[names[1]][0][1]
        os.kill(victim, signal.SIGKILL)
        again = wait_for(
            lambda: len(started(log).get(names[1], [])) == 2 and started(log),
            timeout=60,
            what="the killed worker restarted",
        )
        device, new_pid, _ = again[names[1]][1]
        assert device == "5" and new_pid != victim
        assert [len(again[n]) for n in names] == [1, 2, 1]  # the others were left alone
        survivors = [again[names[0]][0][1], new_pid, again[names[2]][0][1]]
        assert all(alive(pid) for pid in survivors)
    finally:
        pool.send_signal(signal.SIGTERM)
        _, err = pool.communicate(timeout=60)
    assert pool.returncode == 0, err
    stopped = [line for line in log.read_text().splitlines() if line.startswith("stopped ")]
    assert sorted(stopped) == sorted(
        f"stopped {n} {p}" for n, p in zip(names, survivors, strict=True)
    )
    assert not any(alive(pid) for pid in survivors)
    assert f"{names[1]} died (signal SIGKILL)" in err
    assert "every worker stopped" in err


def test_supervisor_gives_up_on_a_worker_that_keeps_dying(tmp_path: Path) -> None:
    pool, _ = start_pool(tmp_path, STAND_IN_DIES="1")
    _, err = pool.communicate(timeout=60)
    assert pool.returncode == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith("lrq pool: error: gpu")
    assert "died 3 times in a row within 5s of starting (last: exit code 3); giving up" in lines[-1]
    assert sum("restart in" in line for line in lines) >= 2  # it tried again, backing off
